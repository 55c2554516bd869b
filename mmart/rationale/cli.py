"""``mmart rationales``: a teacher's justification of each SFT decision's target."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rationales", help="a teacher's short justification of each SFT decision's target (Parquet + record)",
        description=(
            "For each decision SFT trains on (the same sample as `mmart sft`), justify its SFT target (the teacher's "
            "top choice under sft.teacher, else the played artwork) from what the prompt shows. --teacher taste: "
            "the taste teacher's largest evidence for the target, verbalised (deterministic, seconds); --teacher "
            "llm: a local chat LM (rationale.model) prompted with rationale.template, sharded over `accelerate "
            "launch` processes and resumable (finished shards are kept). Writes <out>/rationales.parquet and its "
            "record (rationales.made_from.json); a table made from the same inputs is kept."
        ))
    p.add_argument("--config", default="configs/default.yaml",
                   help="pipeline config YAML (default: configs/default.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set rationale.model=models/teacher rationale.max_new_tokens=96")
    p.add_argument("--teacher", choices=["taste", "llm"], help="who writes the rationales (default: rationale.teacher)")
    p.add_argument("--out", help="folder to write (default: <output_dir>/rationales)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from mmart.config import PipelineConfig, load_config
    from mmart.rationale.stage import run_rationales

    run_rationales(load_config(PipelineConfig, args.config, args.set), args.teacher, args.out)
    return 0
