"""``mmart eval``: every policy on the same test pairs -> report.json, report.md and plots.

Run as: ``mmart eval --data data/world --pred model=outputs/default/preds/dpo.parquet --out outputs/default/eval``
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from mmart.artefacts import read_record
from mmart.data.contract import UNIFORM_POLICY, load_contract
from mmart.errors import UserError
from mmart.eval import fusion as fus
from mmart.eval import policies as pol
from mmart.eval.bootstrap import format_estimate as _fmt
from mmart.eval.cards import update_model_cards
from mmart.eval.metrics import paired_difference, policy_metrics, relative_to, true_value, verdict
from mmart.eval.policies import BASELINE
from mmart.eval.reward_model import log_loss
from mmart.eval.teacher import DEFAULT_TEACHER, TEACHERS, fit_teacher

PRED_COLUMNS = ("user_id", "title_id", "candidates", "probs")
CONFIG_FILE = "pipeline.yaml"  # the resolved config scripts/train.sh saves in the run's output folder


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("titles", "artworks", "users", "impressions"):
        f = path / f"{name}.parquet"
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def read_predictions(name: str, path: str | Path, flag: str = "--pred") -> pd.DataFrame:
    """A ``mmart predict`` Parquet file, or a one-line error naming it (as ``flag NAME=PATH``)."""
    where = f"{flag} {name}={path}"
    if not Path(path).is_file():
        raise UserError(f"{where}: no such file; write it with `mmart predict --out {path}`")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: not a readable Parquet file ({reason}); rerun `mmart predict` to rewrite it") from None
    missing = [c for c in PRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{where}: lacks column(s) {', '.join(missing)}; expected the output of `mmart predict`")
    if frame.empty:
        raise UserError(f"{where}: has no rows; score at least one pair with `mmart predict`")
    return frame


def common_pairs(frames: dict[str, pd.DataFrame], paths: dict[str, str | Path]) -> list[tuple[str, str]]:
    """The (user_id, title_id) pairs every prediction file scores; refuses files that score different pairs."""
    names = list(frames)
    ref = set(zip(frames[names[0]].user_id, frames[names[0]].title_id))
    for name in names[1:]:
        got = set(zip(frames[name].user_id, frames[name].title_id))
        if got != ref:
            raise UserError(
                f"--pred {name}={paths[name]} scores {len(got)} pairs, --pred {names[0]}={paths[names[0]]} {len(ref)} "
                f"({len(got & ref)} in common): paired comparisons need the same pairs; score every model on the same "
                "world with the same --split, --max-pairs, --slice and --seed")
    return list(dict.fromkeys(zip(frames[names[0]].user_id, frames[names[0]].title_id)))


def parse_diff(spec: str, names: list[str]) -> tuple[str, str]:
    """``A-B`` (names may hold dashes: the one split where both sides are known policies) -> (A, B)."""
    spec = spec.replace(" ", "")
    options = [(spec[:i], spec[i + 1:]) for i, ch in enumerate(spec) if ch == "-"
               and spec[:i] in names and spec[i + 1:] in names]
    if len(options) != 1:
        raise UserError(f"--diff {spec!r}: expected A-B with A and B among the policies {', '.join(names)}")
    return options[0]


def resolve_config(config: str | Path | dict | None, preds: dict[str, str | Path]) -> tuple[dict, str | None]:
    """The run's resolved pipeline config: ``config`` (a file or a dict), else the pipeline.yaml that
    scripts/train.sh writes in the run folder, found beside the first predictions file or one folder up."""
    if isinstance(config, dict):
        return config, None
    path = Path(config) if config is not None else None
    if path is None:
        first = Path(next(iter(preds.values())))
        path = next((d / CONFIG_FILE for d in (first.parent, first.parent.parent) if (d / CONFIG_FILE).is_file()), None)
        if path is None:
            return {}, None
    elif not path.is_file():
        raise UserError(f"--config {path}: no such file; give the run's pipeline.yaml (written by scripts/train.sh)")
    import yaml

    from mmart.config import PipelineConfig, from_dict, load_config, to_dict

    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "cache_dir" in data:  # `mmart config` output: resolved, plus derived paths
        cfg = from_dict(PipelineConfig, {k: v for k, v in data.items() if k != "cache_dir"}, str(path))
    else:  # a config as written by hand: resolve its includes
        cfg = load_config(PipelineConfig, path)
    return {**to_dict(cfg), "cache_dir": cfg.cache_dir}, str(path)


def _teacher_kinds(teachers: list[str] | None, config: dict) -> list[str]:
    """Those asked for, else the one the run's SFT distilled, else the default."""
    if teachers:
        bad = [t for t in teachers if t not in TEACHERS]
        if bad:
            raise UserError(f"--teacher {bad[0]!r}: choose one of {', '.join(TEACHERS)}")
        return list(dict.fromkeys(teachers))
    used = (config.get("sft") or {}).get("teacher")
    return [used if used in TEACHERS else DEFAULT_TEACHER]


def evaluate(data_dir: str | Path, preds: dict[str, str | Path], out_dir: str | Path, split: str = "test",
             n_boot: int = 1000, seed: int = 0, config: str | Path | dict | None = None,
             diffs: list[str] | None = None, teachers: list[str] | None = None, fuse: list[str] | None = None,
             fuse_val: dict[str, str | Path] | None = None) -> dict:
    """Score every policy on the pairs the predictions share; write report.json, report.md and the plots,
    and the headline numbers into the model card of each scored model (``mmart.eval.cards``).

    ``diffs``: paired differences "A-B" to add to every scored model minus production.
    ``teachers``: teacher kinds to show as policies (default: the one the run's SFT used, else the default).
    ``fuse``: --pred names to fuse with the (first) teacher as policies ``NAME+teacher`` (``mmart.eval.fusion``),
    their weights fit on ``fuse_val[NAME]``, the same model's predictions on the val split.
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    if not preds:
        raise UserError("give at least one scored model: --pred NAME=preds.parquet (from `mmart predict`)")
    frames = {name: read_predictions(name, p) for name, p in preds.items()}
    pairs = common_pairs(frames, preds)
    fuse_val = _fuse_requests(fuse or [], fuse_val or {}, preds, data_dir, split)
    resolved, config_source = resolve_config(config, preds)
    contract = load_contract(data_dir, check=False)
    first = next(iter(preds))
    _check_pairs_in_split(contract, pairs, f"--pred {first}={preds[first]}", data_dir, split)
    val_frames = {n: _read_val(contract, n, p, preds[n], data_dir) for n, p in fuse_val.items()}
    es = pol.eval_set(contract, split, pairs, data_dir / "oracle.parquet")
    rates = pol.artwork_play_rates(contract)

    kinds = _teacher_kinds(teachers, resolved)
    fitted = {k: fit_teacher(contract, k, "train") for k in dict.fromkeys([*kinds, "taste"])}
    reward_model = fitted["taste"]  # DR's q_hat: the best-calibrated model of the train logs
    q_hat = reward_model.table(es.pairs.user_id, es.pairs.candidates, es.mask.shape[1])
    shown_q = q_hat[es.impressions.pair.to_numpy(), es.impressions.shown.to_numpy()]
    played = es.impressions.played.to_numpy(dtype=float)

    fusions = {fus.fused_name(n): fus.fit_fusion(n, v, str(fuse_val[n]), fitted[kinds[0]], kinds[0])
               for n, v in val_frames.items()}
    policies = _policies(es, frames, kinds, fitted, rates, fusions)
    results = _policy_results(es, policies, n_boot, seed, q_hat)
    wanted = [(name, BASELINE) for name in frames if BASELINE in policies]
    wanted += [parse_diff(d, list(policies)) for d in diffs or []]
    differences = {f"{a} - {b}": {"a_name": a, "b_name": b,
                                  **paired_difference(es, policies[a], policies[b], n_boot, seed, q_hat)}
                   for a, b in dict.fromkeys(wanted)}

    logged = es.impressions[es.impressions["first"]]
    report = {
        "split": split, "pairs": es.size, "impressions": len(es.impressions),
        "pairs_fingerprint": hashlib.sha256("\n".join(f"{u}|{t}" for u, t in sorted(pairs)).encode()).hexdigest()[:16],
        "played_uniform_impressions": int((es.impressions.played & (es.impressions.logging_policy == UNIFORM_POLICY)).sum()),
        "logged_play_rate_first_impressions": float(logged.played.mean()),
        "dataset": str(data_dir), "dataset_fingerprint": _fingerprint(data_dir),
        "predictions": {k: str(v) for k, v in preds.items()},
        "verdicts": _verdicts(frames, differences, results),
        "teachers": kinds,
        "fusions": {n: f.as_dict() for n, f in fusions.items()},
        "reward_model": {  # DR's model, fit on train; its fit on the evaluated impressions, vs a constant
            "kind": reward_model.kind,
            "log_loss": log_loss(shown_q, played),
            "log_loss_constant": log_loss(np.full(len(played), reward_model.prior), played),
        },
        "policies": results,
        "differences": differences,
        "new_titles": _new_title_slice(es, policies, n_boot, seed),
        "config": resolved, "config_source": config_source,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    _plots(report, out)
    update_model_cards(report, preds, out)
    return report


def _check_pairs_in_split(contract, pairs, where: str, data_dir: Path, split: str) -> None:
    """Predictions of another dataset or split would be scored against the wrong outcomes: refuse them."""
    imps = contract.frame("impressions")
    known = set(zip(imps.user_id[imps.split == split], imps.title_id[imps.split == split]))
    outside = [p for p in pairs if p not in known]
    if outside:
        raise UserError(f"{where}: {len(outside)} scored pairs, e.g. {outside[0]}, are not "
                        f"{split} pairs of {data_dir}; score this dataset's split: mmart predict --data {data_dir} "
                        f"--split {split}")


def _fuse_requests(fuse: list[str], fuse_val: dict, preds: dict, data_dir: Path, split: str) -> dict:
    """``--fuse`` names with their ``--fuse-val`` files, or a one-line refusal before anything is fit."""
    for name in fuse:
        if name not in preds:
            raise UserError(f"--fuse {name}: not among the --pred names ({', '.join(preds)}); fuse a scored model")
        if fus.fused_name(name) in preds:
            raise UserError(f"--fuse {name}: a --pred is already named {fus.fused_name(name)}; rename it")
        if name not in fuse_val:
            raise UserError(f"--fuse {name} needs --fuse-val {name}=VAL.parquet, the same model's predictions on the "
                            f"val split (the fusion weights are fit there, never on {split}): "
                            + _val_predict(preds[name], data_dir, "VAL.parquet"))
    stray = [n for n in fuse_val if n not in fuse]
    if stray:
        raise UserError(f"--fuse-val {stray[0]}=...: no --fuse {stray[0]} to fit it for; add --fuse {stray[0]}")
    if fuse and split == "val":
        raise UserError("--fuse fits its weights on val, the split evaluated here: evaluate --split test")
    return {n: fuse_val[n] for n in dict.fromkeys(fuse)}


def _val_predict(pred_path, data_dir: Path, out) -> str:
    """The command that writes the val predictions, with the model ``pred_path`` scored when its record says."""
    model = (read_record(pred_path) or {}).get("model_dir") or "MODEL_DIR"
    return f"mmart predict --model {model} --data {data_dir} --split val --out {out}"


def _read_val(contract, name: str, path, pred_path, data_dir: Path) -> pd.DataFrame:
    """The ``--fuse-val`` file: predictions on the val split of this dataset by the model ``--pred name`` scored."""
    where = f"--fuse-val {name}={path}"
    frame = read_predictions(name, path, flag="--fuse-val")
    splits = sorted(set(frame["split"].astype(str))) if "split" in frame else ["no split column"]
    if splits != ["val"]:
        raise UserError(f"{where}: holds predictions on {', '.join(splits)}, not val; the fusion weights are fit on "
                        "val only: " + _val_predict(pred_path, data_dir, path))
    _check_pairs_in_split(contract, list(zip(frame.user_id, frame.title_id)), where, data_dir, "val")
    models = [((read_record(p) or {}).get("inputs") or {}).get("model") for p in (pred_path, path)]
    if all(models) and models[0] != models[1]:
        raise UserError(f"{where}: scored another model than --pred {name}={pred_path} (their records differ); "
                        "fuse a model with its own val predictions")
    return frame


def _policies(es, frames: dict, kinds: list[str], fitted: dict, rates,
              fusions: dict[str, fus.Fusion] | None = None) -> dict[str, np.ndarray]:
    """Every policy the report scores, in the report's order: the models, the teachers, the fusions, production
    (demo only), the cheap baselines, then the oracles (demo only)."""
    policies: dict[str, np.ndarray] = {name: pol.model_policy(es, f, name=name) for name, f in frames.items()}
    tables = {k: fitted[k].table(es.pairs.user_id, es.pairs.candidates, es.mask.shape[1]) for k in kinds}
    for k in kinds:
        policies["teacher" if len(kinds) == 1 else f"teacher_{k}"] = pol.scores_policy(es, tables[k])
    for name, f in (fusions or {}).items():
        p_model = pol.model_policy(es, frames[f.model], greedy=False, name=f.model)
        policies[name] = pol.scores_policy(es, fus.fused_scores(p_model, tables[f.teacher], es.mask, f.a, f.b))
    if es.p_play is not None:
        policies[BASELINE] = pol.production_policy(es)
    policies["popularity"] = pol.popularity_policy(es, rates)
    policies["random"] = pol.random_policy(es)
    if es.p_taste is not None:
        policies["taste_oracle"] = pol.taste_oracle_policy(es)
    if es.p_play is not None:
        policies["oracle"] = pol.oracle_policy(es)
    return policies


def _policy_results(es, policies: dict[str, np.ndarray], n_boot: int, seed: int, q_hat) -> dict[str, dict]:
    """Each policy's metrics, and its lift and gap closed against production where the demo world gives them."""
    results = {}
    for name, probs in policies.items():
        m = policy_metrics(es, probs, n_boot, seed, q_hat)
        if BASELINE in policies and name != BASELINE:
            m.update(relative_to(es, probs, policies[BASELINE], policies.get("oracle"), n_boot, seed,
                                 policies.get("taste_oracle")))
        results[name] = m
    return results


def _verdicts(frames: dict, differences: dict, results: dict) -> dict[str, str]:
    """One line per scored model: better / worse / no evidence against production, with the paired interval."""
    out = {}
    for name in frames:
        d = differences.get(f"{name} - {BASELINE}")
        if d is None:
            out[name] = f"{name}: no production policy to compare with (its choices need the demo world's oracle.parquet)"
            continue
        metric = "true value" if d["metric"] == "true_value" else "DR estimate"
        line = (f"{name}: {d['verdict']} than production" if d["verdict"] != "no evidence"
                else f"{name}: no evidence of a difference from production")
        line += (f", lift {_fmt(d['lift'], pct=True)} in {metric} ({d['a']:.3f} vs {d['b']:.3f}, "
                 f"{d['pairs']} pairs)")
        gap = results[name].get("gap_closed_taste")
        if gap:
            line += f"; closes {_fmt(gap, pct=True, sign=False)} of the gap to the taste oracle"
        out[name] = line
    return out


def _new_title_slice(es: pol.EvalSet, policies: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    """Pairs whose title is in no training decision: true value and lift there (demo world)."""
    rows = np.flatnonzero(es.new_title) if es.new_title is not None else np.zeros(0, dtype=int)
    out: dict = {"pairs": int(len(rows)), "titles": int(es.pairs.title_id.iloc[rows].nunique()), "policies": {}}
    if not len(rows) or es.p_play is None:
        return out
    for name, probs in policies.items():
        m = {"true_value": true_value(es, probs, rows, n_boot, seed)}
        if BASELINE in policies and name != BASELINE:
            m["lift"] = relative_to(es, probs, policies[BASELINE], None, n_boot, seed, rows=rows)["lift"]
        out["policies"][name] = m
    return out


def markdown(report: dict) -> str:
    pols = report["policies"]
    lines = [
        f"# mmart evaluation ({report['split']}: {report['pairs']} member-title pairs, "
        f"{report['played_uniform_impressions']} played impressions logged uniformly at random)",
        "",
        *[f"- **{line}**" for line in report.get("verdicts", {}).values()],
        "",
        "Values with 95% bootstrap intervals over pairs. Hit rate on the uniformly-logged slice is unbiased; "
        "IPS/SNIPS/DR use each pair's first logged impression; true value is the exact expected play rate "
        "from the demo world's play model; expected hit rate weights every uniformly logged impression (played "
        "or not) by its shown artwork's true play probability (the hit rate's expectation over the plays, demo "
        "world only). Teacher: the greedy choice of the model SFT distils "
        f"({', '.join(report.get('teachers', []))}), fit on the train logs. Taste oracle: the best choice for the "
        "member's true tastes without the per member-artwork noise no model can learn (the reachable ceiling). "
        f"DR's reward model: the {report['reward_model']['kind']} model fit on train "
        f"(log-loss {report['reward_model']['log_loss']:.3f} on these impressions vs "
        f"{report['reward_model']['log_loss_constant']:.3f} for a constant).",
        "",
        "| policy | hit rate (uniform slice) | expected hit rate (uniform slice) | IPS | SNIPS | DR | true value "
        "| lift vs production | gap closed to taste oracle |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in pols.items():
        lift = m.get("lift")
        lift_txt = _fmt(lift, pct=True) + (" (no evidence)" if verdict(lift) == "no evidence" else "") if lift else "-"
        lines.append(f"| {name} | {_fmt(m.get('hit_rate_uniform'))} | {_fmt(m.get('hit_rate_uniform_expected'))} | "
                     f"{_fmt(m.get('ips'))} | {_fmt(m.get('snips'))} | {_fmt(m.get('dr'))} | "
                     f"{_fmt(m.get('true_value'))} | {lift_txt} | {_fmt(m.get('gap_closed_taste'), pct=True)} |")
    for name, f in (report.get("fusions") or {}).items():
        lines += ["", f"{name} is a fusion, not {f['model']} alone: the argmax of a * log p_{f['model']} + b * log "
                  f"p_teacher ({f['teacher']}), (a, b) = ({f['a']:.3f}, {f['b']:.3f}) fit on the "
                  f"{f['played_impressions']} played val impressions of {f['val']} (a conditional logit of the "
                  f"played artwork, each play weighted by min(1/propensity, {f['propensity_clip']:g}), L2 {f['l2']:g}); "
                  f"never on {report['split']}."]
    gaps = {n: m["gap_closed"] for n, m in pols.items() if "gap_closed" in m and n not in ("oracle",)}
    if gaps:
        lines += ["", "Share of the production-to-oracle gap closed (the oracle also knows the unlearnable noise): "
                  + "; ".join(f"{n} {_fmt(g, pct=True)}" for n, g in gaps.items())]
    diffs = report.get("differences") or {}
    if diffs:
        lines += ["", "## Paired differences", "",
                  "Each over the same pairs, both policies resampled together (95% bootstrap interval).", "",
                  "| comparison | value A | value B | A - B | lift (A - B) / B | verdict |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for key, d in diffs.items():
            metric = "true value" if d["metric"] == "true_value" else "DR"
            lines.append(f"| {key} ({metric}) | {d['a']:.3f} | {d['b']:.3f} | {_fmt(d['difference'])} | "
                         f"{_fmt(d['lift'], pct=True)} | {d['verdict']} |")
    new = report.get("new_titles") or {}
    if new.get("pairs"):
        lines += ["", f"## New titles ({new['pairs']} pairs on {new['titles']} titles in no training decision)", ""]
        if new["policies"]:
            lines += ["| policy | true value | lift vs production |", "| --- | --- | --- |"]
            lines += [f"| {n} | {_fmt(m['true_value'])} | {_fmt(m.get('lift'), pct=True)} |"
                      for n, m in new["policies"].items()]
        else:
            lines.append("No true value without the demo world's oracle.parquet.")
    if report.get("config_source"):
        lines += ["", f"Config: {report['config_source']} (resolved, in report.json)."]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pols = report["policies"]
    names = list(pols)
    metric = "true_value" if all("true_value" in m for m in pols.values()) else "snips"
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.6))
    for i, n in enumerate(names):
        e = pols[n][metric]
        ax.errorbar(e["value"], i, xerr=[[e["value"] - e["low"]], [e["high"] - e["value"]]], fmt="o", capsize=3,
                    color=colors[n])
    if BASELINE in pols:  # the reference every lift is relative to
        x = pols[BASELINE][metric]["value"]
        ax.axvline(x, color="grey", ls="--", lw=1)
        ax.text(x, 1.01, f"production {x:.3f}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color="grey")
    ax.set_yticks(range(len(names)), names); ax.invert_yaxis()
    ax.set_xlabel(f"{metric.replace('_', ' ')} (95% interval)"); ax.grid(alpha=0.3)
    ax.set_title(f"Policy values on {report['pairs']} {report['split']} pairs", fontsize=10, pad=16)
    fig.tight_layout(); fig.savefig(out / "policy_values.png", dpi=100); plt.close(fig)
    if metric != "true_value":
        return
    # One colour per policy, one marker per estimator: a point's colour names its policy.
    fig, ax = plt.subplots(figsize=(6.5, 6))
    markers = {"ips": "o", "snips": "s", "dr": "^"}
    values = []
    for n in names:
        x = pols[n]["true_value"]["value"]
        ys = {est: pols[n][est]["value"] for est in markers if est in pols[n]}
        ax.plot([x, x], [min(ys.values()), max(ys.values())], color=colors[n], lw=0.8, alpha=0.6)
        for est, y in ys.items():
            ax.scatter(x, y, marker=markers[est], color=colors[n], s=40, zorder=3)
        values += [x, *ys.values()]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) + 0.005
    ax.set_xlim(lo - pad, hi + pad); ax.set_ylim(lo - pad, hi + pad)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
    ax.set_xlabel("true value"); ax.set_ylabel("off-policy estimate")
    ax.set_title("Off-policy estimates vs the true value (on the dashed line: estimate = truth)", fontsize=9)
    policy_legend = ax.legend([Line2D([], [], color=colors[n], marker="o", ls="") for n in names], names,
                              title="policy", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.add_artist(policy_legend)
    ax.legend([Line2D([], [], color="k", marker=m, ls="") for m in markers.values()], list(markers),
              title="estimator", loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8)
    ax.grid(alpha=0.3); fig.savefig(out / "estimators_vs_truth.png", dpi=100, bbox_inches="tight",
                                    bbox_extra_artists=[policy_legend])
    plt.close(fig)
