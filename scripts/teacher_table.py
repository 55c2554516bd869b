"""How good is each teacher? Its greedy choice's true value on every test pair of several demo worlds.

Run as: python scripts/teacher_table.py [--out outputs/teacher_table] [--worlds NAME=PRESET[:KEY=VALUE,...] ...]

For each world (generated into OUT/worlds/NAME, or reused when generated from the same config) it fits every
teacher on the train logs and prints a Markdown table: production, taste oracle, oracle, each teacher's greedy
true value, and the share of the production-to-taste-oracle gap each teacher closes (95% bootstrap interval over
pairs); table.md and table.json go to OUT. A few seconds per world besides generation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mmart.config import CONFIG_ROOT, load_config, to_dict
from mmart.data.contract import load_contract
from mmart.data.world import WorldConfig, generate_world
from mmart.eval import policies as pol
from mmart.eval.metrics import relative_to
from mmart.eval.teacher import TEACHERS, fit_teacher

WORLDS = ("default=default", "default_seed1=default:seed=1", "strong_production=strong_production",
          "room_to_learn=room_to_learn")


def _world(spec: str, root: Path) -> tuple[str, Path]:
    name, rest = spec.split("=", 1)
    preset, _, sets = rest.partition(":")
    cfg = load_config(WorldConfig, CONFIG_ROOT / "world" / f"{preset}.yaml", [s for s in sets.split(",") if s])
    out = root / name
    summary = out / "world_summary.json"
    if not (summary.is_file() and json.loads(summary.read_text()).get("config") == json.loads(json.dumps(to_dict(cfg)))):
        generate_world(cfg, out, progress=False)
    return name, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/teacher_table")
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), metavar="NAME=PRESET[:KEY=VALUE,...]")
    ap.add_argument("--n-boot", type=int, default=300)
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for spec in args.worlds:
        name, data = _world(spec, out / "worlds")
        contract = load_contract(data, check=False)
        imps = contract.frame("impressions")
        test = imps[imps.split == "test"]
        es = pol.eval_set(contract, "test", list(dict.fromkeys(zip(test.user_id, test.title_id))), data / "oracle.parquet")
        prod, taste, oracle = pol.production_policy(es), pol.taste_oracle_policy(es), pol.oracle_policy(es)
        value = lambda probs, rows=slice(None): float((probs * es.p_play).sum(1)[rows].mean())  # noqa: E731
        row = {"world": name, "pairs": es.size, "new_title_pairs": int(es.new_title.sum()),
               "production": value(prod), "taste_oracle": value(taste), "oracle": value(oracle), "teachers": {}}
        for kind in TEACHERS:
            start = time.perf_counter()
            teacher = fit_teacher(contract, kind)
            seconds = time.perf_counter() - start
            choice = pol.scores_policy(es, teacher.table(es.pairs.user_id, es.pairs.candidates, es.mask.shape[1]))
            rel = relative_to(es, choice, prod, None, args.n_boot, 0, taste_top=taste)
            new_rows = np.flatnonzero(es.new_title)
            new = relative_to(es, choice, prod, None, args.n_boot, 0, rows=new_rows) if len(new_rows) else {"lift": None}
            row["teachers"][kind] = {"value": value(choice), "gap_closed_taste": rel["gap_closed_taste"],
                                     "lift": rel["lift"], "new_title_lift": new["lift"], "fit_seconds": seconds}
        rows.append(row)
        print(f"{name}: done", flush=True)

    pct = lambda e, sign="": f"{100 * e['value']:{sign}.0f}% [{100 * e['low']:{sign}.0f}, {100 * e['high']:{sign}.0f}]"  # noqa: E731
    lines = ["| world | test pairs | production | taste oracle | oracle | "
             + " | ".join(f"teacher {k} (greedy)" for k in TEACHERS) + " | "
             + " | ".join(f"gap closed by {k} vs taste oracle" for k in TEACHERS)
             + " | lift of taste teacher on new titles |",
             "| --- " * (6 + 2 * len(TEACHERS)) + "|"]
    for r in rows:
        t = r["teachers"]
        lines.append(f"| {r['world']} | {r['pairs']} | {r['production']:.3f} | {r['taste_oracle']:.3f} | {r['oracle']:.3f} | "
                     + " | ".join(f"{t[k]['value']:.3f}" for k in TEACHERS) + " | "
                     + " | ".join(pct(t[k]["gap_closed_taste"]) for k in TEACHERS)
                     + (f" | {pct(t['taste']['new_title_lift'], '+')} ({r['new_title_pairs']} pairs) |"
                        if r["new_title_pairs"] else " | - |"))
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
