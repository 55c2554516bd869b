"""``mmart sft``, ``mmart dpo`` and ``mmart predict``."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

DEFAULT_CONFIG = "configs/default.yaml"

# The settings that decide what a training stage learns, shown with their values under the default
# config in the stage's --help (read from that config and the fields' own help, so they cannot drift).
STAGE_SETTINGS = {
    "sft": ("sft.examples", "sft.teacher", "sft.max_examples", "sft.unlogged_titles", "sft.reasoning", "prompt.answer"),
    "dpo": ("dpo.method", "dpo.pairs", "dpo.teacher", "dpo.negatives", "dpo.max_examples", "prompt.answer"),
}


def stage_settings(stage: str, config: str = DEFAULT_CONFIG) -> list[tuple[str, object, str]]:
    """``(dotted key, value under config, the field's help)`` for each of the stage's STAGE_SETTINGS."""
    from mmart.config import PipelineConfig, load_config

    cfg = load_config(PipelineConfig, config)
    out = []
    for key in STAGE_SETTINGS[stage]:
        section, name = key.split(".")
        obj = getattr(cfg, section)
        f = next(f for f in dataclasses.fields(obj) if f.name == name)
        out.append((key, getattr(obj, name), f.metadata.get("help", "")))
    return out


def settings_epilog(stage: str) -> str:
    """The --help epilog: the stage's deciding settings as ``key=value`` under the default config, each with its help."""
    lines = [f"With the default --config ({DEFAULT_CONFIG}) it runs with:"]
    for key, value, help_ in stage_settings(stage):
        lines.append(f"  {key}={'null' if value is None else value}")
        lines += textwrap.wrap(help_, width=100, initial_indent="      ", subsequent_indent="      ")
    lines.append(f"`mmart config --fields {stage}` lists every setting; --set overrides any of them.")
    return "\n".join(lines)


class _SettingsHelp(argparse.HelpFormatter):
    """Wraps the description as usual and prints the epilog as given; a callable epilog is built only when
    --help is printed (it loads the default config, which every other command would pay for)."""

    def add_text(self, text):
        if callable(text):
            self._add_item(lambda t: t + "\n", [text()])
        else:
            super().add_text(text)

from mmart.config_checks import at_least, cli_number


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set sft.max_examples=100 model.lora_r=8")


def _redo_arg(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--redo", action="store_true",
                   help=f"train from scratch: discard <output_dir>/{stage}/checkpoints, and train even when "
                        f"<output_dir>/{stage}/model is up to date (without it, an up-to-date model is kept)")


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "init", help="save the untrained chooser (zero-shot baseline): LLM + stage-0 aligned projector",
        description=(
            "Build the chooser SFT starts from (the LLM, a projector aligned to the LLM's embeddings of each "
            "artwork's tags, a zero LoRA adapter) and save it to <output_dir>/init/model: the untrained "
            "(zero-shot) baseline that `mmart predict` and `mmart eval` score beside the trained model."
        ))
    _config_args(i)
    i.set_defaults(func=_init)

    p = sub.add_parser(
        "sft", help="supervised fine-tuning of the chooser's choice (LoRA + projector)",
        description=(
            "Fine-tune the chooser (LLM + artwork projector, LoRA via PEFT) on TRL's SFTTrainer with a listwise "
            "choice loss: a softmax over each decision's candidate scores (read as prompt.answer says) against the "
            "played candidate where there is one, mixed with a teacher's choice distribution when sft.teacher "
            "names one; sft.examples picks the decisions (candidate order shuffled per example). "
            "Checkpoints every sft.save_steps under <output_dir>/sft/checkpoints and resumes from the last one; "
            "writes <output_dir>/sft/model (adapter, projector, tokenizer, curves.png)."
        ), epilog=lambda: settings_epilog("sft"), formatter_class=_SettingsHelp)
    _config_args(p)
    _redo_arg(p, "sft")
    p.set_defaults(func=_sft)

    d = sub.add_parser(
        "dpo", help="preference tuning after SFT on chosen-over-rejected pairs (dpo.pairs)",
        description=(
            "DPO on top of the SFT model (merged; the reference is the SFT model itself), on the chosen-over-rejected "
            "pairs dpo.pairs says, counted in decisions (dpo.max_examples). dpo.method picks the trainer: one "
            "shared forward that scores every candidate (policy and reference), or TRL's DPOTrainer on "
            "(chosen, rejected) letter pairs. Resumes from <output_dir>/dpo/checkpoints; writes <output_dir>/dpo/model."
        ), epilog=lambda: settings_epilog("dpo"), formatter_class=_SettingsHelp)
    _config_args(d)
    d.add_argument("--sft-model", help="SFT chooser folder (default: <output_dir>/sft/model)")
    _redo_arg(d, "dpo")
    d.set_defaults(func=_dpo)

    e = sub.add_parser(
        "export", help="write a standalone merged model (LoRA folded in) from a saved chooser",
        description=(
            "Fold a saved chooser's LoRA adapter into the LLM and write a standalone folder: the merged LLM "
            "(loadable with AutoModelForCausalLM.from_pretrained), the projector and the tokenizer. "
            "`mmart predict --model` loads it like any chooser."
        ))
    e.add_argument("--model", required=True, help="saved chooser folder, e.g. outputs/default/dpo/model")
    e.add_argument("--out", required=True, help="folder to write")
    e.set_defaults(func=_export)

    r = sub.add_parser(
        "predict", help="score every candidate of each member-title pair in one forward",
        description=(
            "Load a saved chooser and score each member-title pair of a split with one forward pass (the "
            "candidates' letter log-probabilities at the answer position, or each candidate's log p(' yes') "
            "right after its artwork, per prompt.answer; softmax over the candidates). Writes one row per impression: "
            "candidates, their probabilities, the choice, the shown artwork's probability. Uses the prompt and "
            "cache settings saved with the model (pipeline.yaml) unless --config is given."
        ))
    r.add_argument("--model", required=True, help="saved chooser folder, e.g. outputs/default/dpo/model")
    r.add_argument("--data", required=True, help="dataset folder")
    r.add_argument("--split", default="test", choices=["train", "val", "test"])
    r.add_argument("--out", required=True, help="Parquet file to write")
    r.add_argument("--config", help="pipeline config (default: the one saved with the model)")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides on --config")
    r.add_argument("--batch-size", type=cli_number(int, at_least, 1), default=16)
    r.add_argument("--max-pairs", type=cli_number(int, at_least, 0), default=0, help="score a seeded sample of this many pairs (0 = all)")
    r.add_argument("--explain", action="store_true",
                   help="also have the model write its own rationale for each pair (a `rationale` column; the review "
                        "page shows it). For a model trained with sft.reasoning: auxiliary; one trained with "
                        "before_answer always writes one (its answer reads it); refused for reasoning: none")
    r.add_argument("--slice", default="all", choices=["all", "uniform"],
                   help="uniform: only pairs with an impression logged by the uniformly random policy "
                        "(impressions.logging_policy == 'uniform'), the slice whose hit rate is unbiased")
    r.add_argument("--no-pack", action="store_true",
                   help="one prompt per member-title pair instead of packing a member's titles behind one read of "
                        "their history (eval.pack_titles); the scores are the same, packing is faster")
    r.set_defaults(func=_predict)


def _load(args):
    from mmart.config import PipelineConfig, load_config

    return load_config(PipelineConfig, args.config, args.set)


def _init(args) -> int:
    from mmart.train.init import run_init

    run_init(_load(args))
    return 0


def _sft(args) -> int:
    from mmart.train.sft import run_sft

    run_sft(_load(args), redo=args.redo)
    return 0


def _dpo(args) -> int:
    from mmart.train.dpo import run_dpo

    run_dpo(_load(args), sft_model_dir=args.sft_model, redo=args.redo)
    return 0


def _export(args) -> int:
    from mmart.model.checkpoint import export_merged

    print(f"[mmart export] wrote {export_merged(args.model, args.out)}")
    return 0


def _predict(args) -> int:
    from mmart.predict import predict

    cfg = _load(args) if args.config else None
    predict(args.model, args.data, args.split, args.out, cfg=cfg, batch_size=args.batch_size,  # prints its summary
            max_pairs=args.max_pairs, slice_=args.slice, pack_titles=1 if args.no_pack else None,
            explain=args.explain)
    return 0
