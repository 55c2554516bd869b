"""``mmart status``: which stages of a run are up to date, and why the others must run again.

Run as: ``mmart status --config configs/default.yaml [--stage sft] [--quiet]``

Each stage's output carries a record of what it was made from (``mmart.artefacts``); a stage
is up to date when that record equals what the stage would be made from now: the same config
sections, the same dataset tables and cache, the same earlier stage's output. ``scripts/train.sh``
runs a stage when this says it is not up to date, and every later stage follows, since each
records the fingerprint of the output before it. The rationales table is listed (before SFT, which
records its fingerprint) only when ``sft.reasoning`` trains on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# scripts/train.sh's layout: predictions of each model, and the report's names for them.
PREDICTED = {"dpo": "model", "sft": "sft", "init": "untrained"}
STAGES = ["init", "rationales", "sft", "dpo", "predict", "eval"]


def predicted(cfg) -> dict[str, str]:
    """The models scripts/train.sh scores under this config: the untrained one only with ``eval.untrained``."""
    return {m: name for m, name in PREDICTED.items() if m != "init" or cfg.eval.untrained}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="which stages of a run are up to date with its config and inputs, and why not",
        description=(
            "Compare what each stage's output was made from (its made_from.json: config sections, dataset, cache, "
            "the earlier stage's output) with what the config would make now, for the stages init, rationales "
            "(when sft.reasoning is not none), sft, dpo, predict (preds/dpo, preds/sft, and preds/init with "
            "eval.untrained) and eval, laid out as scripts/train.sh lays them out under output_dir. With --stage, "
            "exit 0 when that stage is up to date and 1 when it must run (train.sh uses this); a stage whose inputs "
            "changed is never resumed from its old checkpoints."
        ))
    p.add_argument("--config", required=True, help="pipeline config YAML")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    p.add_argument("--stage", choices=STAGES, help="check one stage (exit code)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing (with --stage: the exit code says)")
    p.set_defaults(func=_run)


def stages(cfg) -> list[str]:
    """The stages scripts/train.sh runs under this config: the rationales table only for an SFT that reads it."""
    return [s for s in STAGES if s != "rationales" or cfg.sft.reasoning != "none"]


def stage_status(cfg, stage: str) -> dict[str, list[str]]:
    """artefact path -> reasons it must be made again (empty: up to date)."""
    from mmart.artefacts import made_from, stale

    out = Path(cfg.output_dir)
    if stage == "rationales":  # the table train.sh writes: rationale.teacher's, where SFT reads it
        from mmart.rationale.record import rationale_made_from, rationale_table

        table = rationale_table(cfg)
        return {str(table): stale(table, rationale_made_from(cfg, cfg.rationale.teacher))}
    if stage in ("init", "sft", "dpo"):
        path = out / stage / "model"
        return {str(path): stale(path, made_from(cfg, stage))}
    if stage == "predict":
        return {str(out / "preds" / f"{m}.parquet"): stale(out / "preds" / f"{m}.parquet",
                                                         made_from(cfg, "predict", model_dir=out / m / "model"))
                for m in predicted(cfg)}
    preds = {name: str(out / "preds" / f"{m}.parquet") for m, name in predicted(cfg).items()}
    return {str(out / "eval"): stale(out / "eval", made_from(cfg, "eval", preds=preds))}


def _run(args: argparse.Namespace) -> int:
    from mmart.config import PipelineConfig, load_config

    cfg = load_config(PipelineConfig, args.config, args.set)
    fresh = True
    for stage in [args.stage] if args.stage else stages(cfg):
        for path, why in stage_status(cfg, stage).items():
            fresh &= not why
            if not args.quiet:
                print(f"{stage:<10} {'up to date' if not why else 'must run'}: {path}"
                      + ("" if not why else f" ({'; '.join(why)})"))
    return 0 if fresh or not args.stage else 1
