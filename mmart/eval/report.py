"""``mmart eval``: every policy on the same test pairs -> report.json, report.md and plots.

Run as: ``mmart eval --data data/world --pred model=outputs/default/preds.parquet --out outputs/default/eval``
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmart.data.contract import UNIFORM_POLICY, load_contract
from mmart.errors import UserError
from mmart.eval import policies as pol
from mmart.eval.metrics import policy_metrics, relative_to, verdict
from mmart.eval.reward_model import FEATURES, fit_reward_model, log_loss


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("titles", "artworks", "users", "impressions"):
        f = path / f"{name}.parquet"
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def evaluate(data_dir: str | Path, preds: dict[str, str | Path], out_dir: str | Path, split: str = "test",
             n_boot: int = 1000, seed: int = 0, config: dict | None = None) -> dict:
    data_dir, out = Path(data_dir), Path(out_dir)
    if not preds:
        raise UserError("give at least one scored model: --pred NAME=preds.parquet (from `mmart predict`)")
    contract = load_contract(data_dir, check=False)
    frames = {name: pd.read_parquet(p) for name, p in preds.items()}
    first = next(iter(frames.values()))
    pairs = list(dict.fromkeys(zip(first.user_id, first.title_id)))
    es = pol.eval_set(contract, split, pairs, data_dir / "oracle.parquet")
    rates = pol.artwork_play_rates(contract)
    reward_model = fit_reward_model(contract, "train")
    q_hat = reward_model.table(es.pairs.user_id, es.pairs.candidates, es.mask.shape[1])
    shown_q = q_hat[es.impressions.pair.to_numpy(), es.impressions.shown.to_numpy()]
    played = es.impressions.played.to_numpy(dtype=float)

    policies: dict[str, np.ndarray] = {name: pol.model_policy(es, f) for name, f in frames.items()}
    if es.p_play is not None:
        policies["production"] = pol.production_policy(es)
    policies["popularity"] = pol.popularity_policy(es, rates)
    policies["random"] = pol.random_policy(es)
    if es.p_play is not None:
        policies["oracle"] = pol.oracle_policy(es)

    results = {}
    for name, probs in policies.items():
        m = policy_metrics(es, probs, n_boot, seed, q_hat)
        if "production" in policies and name != "production":
            m.update(relative_to(es, probs, policies["production"], policies.get("oracle"), n_boot, seed))
        results[name] = m
    logged = es.impressions[es.impressions["first"]]
    report = {
        "split": split, "pairs": es.size, "impressions": len(es.impressions),
        "played_uniform_impressions": int((es.impressions.played & (es.impressions.logging_policy == UNIFORM_POLICY)).sum()),
        "logged_play_rate_first_impressions": float(logged.played.mean()),
        "dataset": str(data_dir), "dataset_fingerprint": _fingerprint(data_dir),
        "predictions": {k: str(v) for k, v in preds.items()},
        "reward_model": {  # DR's model, fit on train; its fit on the evaluated impressions, vs a constant
            "kind": "logistic regression", "features": list(FEATURES),
            "weights": [float(w) for w in reward_model.weights],
            "log_loss": log_loss(shown_q, played),
            "log_loss_constant": log_loss(np.full(len(played), reward_model.prior), played),
        },
        "policies": results, "config": config or {},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    _plots(report, out)
    return report


def _fmt(est: dict | None, pct: bool = False) -> str:
    if not est:
        return "-"
    f = (lambda x: f"{100 * x:+.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(est['value'])} [{f(est['low'])}, {f(est['high'])}]"


def markdown(report: dict) -> str:
    lines = [
        f"# mmart evaluation ({report['split']}: {report['pairs']} member-title pairs, "
        f"{report['played_uniform_impressions']} played impressions logged uniformly at random)",
        "",
        "Values with 95% bootstrap intervals over pairs. Hit rate on the uniformly-logged slice is unbiased; "
        "IPS/SNIPS/DR use each pair's first logged impression; true value is the exact expected play rate "
        "from the demo world's play model; expected hit rate weights every uniformly logged impression (played "
        "or not) by its shown artwork's true play probability (the hit rate's expectation over the plays, demo "
        "world only). DR's reward model: logistic regression on train "
        f"(log-loss {report['reward_model']['log_loss']:.3f} on these impressions vs "
        f"{report['reward_model']['log_loss_constant']:.3f} for a constant).",
        "",
        "| policy | hit rate (uniform slice) | expected hit rate (uniform slice) | IPS | SNIPS | DR | true value "
        "| lift vs production |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in report["policies"].items():
        lift = m.get("lift")
        lift_txt = _fmt(lift, pct=True) + (" (no evidence)" if lift and verdict(lift) == "no evidence" else "") if lift else "-"
        lines.append(f"| {name} | {_fmt(m.get('hit_rate_uniform'))} | {_fmt(m.get('hit_rate_uniform_expected'))} | "
                     f"{_fmt(m.get('ips'))} | {_fmt(m.get('snips'))} | "
                     f"{_fmt(m.get('dr'))} | {_fmt(m.get('true_value'))} | {lift_txt} |")
    gaps = {n: m["gap_closed"] for n, m in report["policies"].items() if "gap_closed" in m and n not in ("oracle",)}
    if gaps:
        lines += ["", "Share of the production-to-oracle gap closed: "
                  + "; ".join(f"{n} {_fmt(g, pct=True)}" for n, g in gaps.items())]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["policies"])
    metric = "true_value" if all("true_value" in m for m in report["policies"].values()) else "snips"
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    for i, n in enumerate(names):
        e = report["policies"][n][metric]
        ax.errorbar(e["value"], i, xerr=[[e["value"] - e["low"]], [e["high"] - e["value"]]], fmt="o", capsize=3)
    ax.set_yticks(range(len(names)), names); ax.set_xlabel(f"{metric} (95% interval)"); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(out / "policy_values.png", dpi=100); plt.close(fig)
    if metric != "true_value":
        return
    fig, ax = plt.subplots(figsize=(5, 5))
    for est, marker in (("ips", "o"), ("snips", "s"), ("dr", "^")):
        xs = [report["policies"][n]["true_value"]["value"] for n in names if est in report["policies"][n]]
        ys = [report["policies"][n][est]["value"] for n in names if est in report["policies"][n]]
        ax.scatter(xs, ys, marker=marker, label=est)
    lo = min(min(m["true_value"]["value"] for m in report["policies"].values()), 0.2)
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8); ax.set_xlabel("true value"); ax.set_ylabel("estimate")
    ax.legend(); ax.grid(alpha=0.3); fig.tight_layout(); fig.savefig(out / "estimators_vs_truth.png", dpi=100)
    plt.close(fig)
