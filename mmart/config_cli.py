"""``mmart config``: print a resolved pipeline config, one section, or one value (for scripts)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print a resolved config (after includes and overrides), a section, or one value",
        description=(
            "Resolve a pipeline config (configs/default.yaml, configs/smoke.yaml, ...) with its included "
            "section files and --set overrides, and print it as YAML. --section NAME prints one section "
            "(e.g. the world preset to pass to `mmart world`); --get KEY prints one value (for shell scripts)."
        ),
    )
    p.add_argument("config", help="pipeline config YAML")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. world.seed=3")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--section", help="print only this section (YAML)")
    g.add_argument("--get", metavar="KEY", help="print one dotted value, e.g. data_dir")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import yaml

    from mmart.config import PipelineConfig, load_config, to_dict
    from mmart.errors import UserError

    cfg = load_config(PipelineConfig, args.config, args.set)
    data = {**to_dict(cfg), "cache_dir": cfg.cache_dir}  # derived: where the embedding cache lives
    key = args.section or args.get
    if key:
        for part in key.split("."):
            if not isinstance(data, dict) or part not in data:
                raise UserError(f"{args.config}: no key {key!r}")
            data = data[part]
    if args.get is not None and not isinstance(data, (dict, list)):
        print(data)
    elif args.get is not None:
        print(json.dumps(data))
    else:
        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0
