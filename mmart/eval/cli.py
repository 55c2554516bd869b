"""``mmart eval``: score every policy on the same test pairs and write the report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="compare the trained model with the baselines: hit rate, IPS/SNIPS/DR, true value, lift",
        description=(
            "Score every policy on the same member-title pairs (those in the first --pred file): each scored model, "
            "production (the logging model's greedy choice), popularity, random and, on the demo world, the oracle. "
            "Reports hit rate and MRR per logging slice (the uniformly-logged slice is unbiased), IPS/SNIPS/DR on "
            "each pair's first logged impression, the true value from oracle.parquet, lift over production and the "
            "share of the oracle gap closed, each with a 95% bootstrap interval over pairs. Writes report.json, "
            "report.md, policy_values.png and estimators_vs_truth.png into --out."
        ))
    p.add_argument("--data", required=True, help="dataset folder (with oracle.parquet for the demo world)")
    p.add_argument("--pred", nargs="+", required=True, metavar="NAME=PATH",
                   help="scored models from `mmart predict`, e.g. model=outputs/default/preds.parquet")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--split", default="test")
    p.add_argument("--n-boot", type=_at_least_one, default=1000, help="bootstrap resamples (>= 1; default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _at_least_one(text: str) -> int:
    """--n-boot: a positive integer (numpy failed on a negative count deep in the bootstrap)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _run(args: argparse.Namespace) -> int:
    from mmart.errors import UserError
    from mmart.eval.report import evaluate

    preds = {}
    for item in args.pred:
        if "=" not in item:
            raise UserError(f"--pred {item!r}: expected NAME=PATH, e.g. model=outputs/default/preds.parquet")
        name, path = item.split("=", 1)
        preds[name] = path
    evaluate(args.data, preds, args.out, args.split, args.n_boot, args.seed)
    print((__import__("pathlib").Path(args.out) / "report.md").read_text())
    return 0
