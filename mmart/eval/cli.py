"""``mmart eval``: score every policy on the same test pairs and write the report."""

from __future__ import annotations

import argparse

from mmart.config_checks import at_least, cli_number, seeds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="compare the trained model with the baselines: hit rate, IPS/SNIPS/DR, true value, lift",
        description=(
            "Score every policy on the same member-title pairs (every --pred file must score the same ones): each "
            "scored model, the teacher SFT distils, production (the logging model's greedy choice), popularity, "
            "random and, on the demo world, the taste oracle and the oracle. Reports hit rate and MRR per logging "
            "slice (the uniformly-logged slice is unbiased), IPS/SNIPS/DR on each pair's first logged impression, "
            "the true value from oracle.parquet, lift over production and the share of the gap to the taste oracle "
            "and to the oracle closed, paired differences (every model minus production, plus each --diff), and the "
            "slice of titles in no training decision, each with a 95% bootstrap interval over pairs. --fuse adds a "
            "model fused with the teacher as a policy of its own, its weights fit on val predictions. Opens with a "
            "one-line verdict per model. Writes report.json, report.md, policy_values.png and "
            "estimators_vs_truth.png into --out, and each scored model's headline numbers into the model card "
            "(README.md) of the folder `mmart predict` scored; docs/evaluation.md says what each number means."
        ))
    p.add_argument("--data", required=True, help="dataset folder (with oracle.parquet for the demo world)")
    p.add_argument("--pred", nargs="+", action="extend", required=True, metavar="NAME=PATH",
                   help="scored models from `mmart predict`, e.g. model=outputs/default/preds.parquet (several after one --pred, or --pred repeated)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--split", default="test")
    p.add_argument("--n-boot", type=cli_number(int, at_least, 1), default=1000, help="bootstrap resamples (>= 1; default 1000)")
    p.add_argument("--seed", type=cli_number(int, seeds), default=0, help="bootstrap seed")
    p.add_argument("--diff", action="append", default=[], metavar="A-B",
                   help="a paired difference to report, e.g. model-sft or model-text (repeatable; names from --pred, "
                        "teacher, each --fuse NAME+teacher, production, popularity, random, taste_oracle, oracle); "
                        "every --pred model minus production is always reported")
    p.add_argument("--config", default=None,
                   help="the run's resolved pipeline config, recorded in report.json (default: pipeline.yaml beside "
                        "the first --pred file or one folder up, as scripts/train.sh writes it)")
    p.add_argument("--teacher", action="append", default=None, choices=["reward_model", "taste"],
                   help="teacher(s) to show as policies (default: the run config's sft.teacher, else taste)")
    p.add_argument("--fuse", action="append", default=[], metavar="NAME",
                   help="add the policy NAME+teacher (NAME among --pred): the argmax of a * log p_model + b * log "
                        "p_teacher, a fusion of the model with the (first) teacher, not the model alone; (a, b) are "
                        "fit on --fuse-val NAME=..., never on the evaluated split, and printed in the report "
                        "(repeatable; --diff NAME+teacher-teacher compares it with the teacher)")
    p.add_argument("--fuse-val", action="append", default=[], metavar="NAME=PATH",
                   help="the same model's predictions on the val split for --fuse NAME (`mmart predict --model ... "
                        "--split val --out ...`): (a, b) are a conditional logit of the played artwork over its "
                        "played impressions, each weighted by min(1/propensity, 10)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mmart.errors import UserError
    from mmart.eval.report import evaluate

    preds = {}
    for item in args.pred:
        if "=" not in item:
            raise UserError(f"--pred {item!r}: expected NAME=PATH, e.g. model=outputs/default/preds.parquet")
        name, path = item.split("=", 1)
        preds[name] = path
    fuse_val = {}
    for item in args.fuse_val:
        if "=" not in item:
            raise UserError(f"--fuse-val {item!r}: expected NAME=PATH, e.g. model=outputs/default/preds/val.parquet")
        name, path = item.split("=", 1)
        fuse_val[name] = path
    from mmart.artefacts import eval_made_from, write_record

    evaluate(args.data, preds, args.out, args.split, args.n_boot, args.seed, config=args.config, diffs=args.diff,
             teachers=args.teacher, fuse=args.fuse, fuse_val=fuse_val)
    write_record(args.out, eval_made_from(args.data, preds, args.n_boot, args.seed, fuse_val))
    print((__import__("pathlib").Path(args.out) / "report.md").read_text())
    return 0
