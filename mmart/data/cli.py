"""``mmart world`` (generate the demo world) and ``mmart validate`` (check a dataset folder)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "world",
        help="generate the demo world (contract tables, artworks, oracle, summary)",
        description=(
            "Generate a synthetic catalog, members, histories and logged impressions with a known ground "
            "truth (oracle.parquet) into a contract-valid dataset folder. Deterministic: the same config "
            "and seed give byte-identical tables. Example: mmart world --config configs/world/default.yaml "
            "--out data/world"
        ),
    )
    p.add_argument("--config", default="configs/world/default.yaml", help="world preset YAML (tiny, default, paper)")
    p.add_argument("--out", required=True,
                   help="dataset folder to write: new, empty, or a world mmart wrote before (its tables and images/ "
                        "are replaced); any other folder is refused unless --force")
    p.add_argument("--force", action="store_true",
                   help="write into --out even though it is not empty and holds no world_summary.json "
                        "(its images/ folder is deleted)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set num_titles=50 seed=3")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--reuse", action="store_true",
                   help="keep an existing world in --out when it was generated from the same config")
    p.set_defaults(func=_world)

    v = sub.add_parser(
        "validate",
        help="check a dataset folder against the data contract",
        description=(
            "Check every rule of the data contract (docs/data.md): schema, unique ids, foreign keys, "
            ">= 2 artworks per title, propensities in (0, 1], image paths inside the folder and naming regular "
            "files, history older than impressions, no member-title pair in two splits, played train impressions "
            "and test impressions present. Lists every problem with its file, row "
            "key and fix; exits 1 if any."
        ),
    )
    v.add_argument("dataset", help="dataset folder holding titles/artworks/users/impressions.parquet")
    v.set_defaults(func=_validate)


def _world(args: argparse.Namespace) -> int:
    from mmart.config import load_config
    from mmart.data.world import WorldConfig, generate_world

    cfg = load_config(WorldConfig, args.config, args.set)
    _check_out(args.out, args.force)
    if args.reuse and _same_world(cfg, args.out):
        print(f"{args.out}: up to date (generated from the same config); pass no --reuse to regenerate")
        return 0
    summary = generate_world(cfg, args.out, progress=not args.no_progress)
    shown = {k: v for k, v in summary.items() if k != "config"}
    print(json.dumps(shown, indent=2))
    print(f"wrote {args.out} (tables, images/, oracle.parquet, world_summary.json, contact_sheet.png)")
    return 0


def _check_out(out: str, force: bool) -> None:
    """Refuse to overwrite a folder that is not an mmart world: generating replaces its images/ and tables."""
    from pathlib import Path

    from mmart.errors import UserError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pass a folder for the world")
    if force or not path.is_dir() or (path / "world_summary.json").is_file() or not any(path.iterdir()):
        return
    raise UserError(f"--out {out} is not empty and is not a world written by mmart (no world_summary.json); "
                    "writing the world there would delete its images/ and replace its tables. Choose a new or empty "
                    "folder, or pass --force to write into it anyway")


def _same_world(cfg, out: str) -> bool:
    from pathlib import Path

    from mmart.config import to_dict

    summary = Path(out) / "world_summary.json"
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text()).get("config") == json.loads(json.dumps(to_dict(cfg)))
    except json.JSONDecodeError:
        return False


def _validate(args: argparse.Namespace) -> int:
    from mmart.cli import report_problems
    from mmart.data.contract import validate

    return report_problems(args.dataset, validate(args.dataset), "valid")
