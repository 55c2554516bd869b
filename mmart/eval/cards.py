"""The report's headline numbers, written into the model card of each model ``mmart eval`` scored.

A predictions file's record (``preds.made_from.json``, written by ``mmart predict``) names the
model folder it scored and that folder's fingerprint. The card of that folder gets the results
section (``mmart.model.card.set_results``) only while the folder still holds the same weights: a
model retrained since it was scored keeps its card as it is.
"""

from __future__ import annotations

from pathlib import Path

from mmart.artefacts import model_fingerprint, read_record
from mmart.eval.bootstrap import format_estimate
from mmart.eval.policies import BASELINE
from mmart.log import say


def headline_lines(report: dict, name: str, report_dir: str | Path) -> list[str]:
    """The card's results lines for the scored model ``name``: where it was evaluated, its value,
    and its lift over production with the 95% interval, significant or not."""
    lines = [f"- Evaluated by `mmart eval` on `{report['dataset']}` (data fingerprint `{report['dataset_fingerprint']}`"
             f", {report['split']} split, {report['pairs']} member-title pairs); the full report is "
             f"`{Path(report_dir) / 'report.md'}`."]
    verdict = (report.get("verdicts") or {}).get(name)
    if verdict:
        lines.append(f"- **{verdict[len(name) + 2:] if verdict.startswith(name + ': ') else verdict}**.")
    d = (report.get("differences") or {}).get(f"{name} - {BASELINE}")
    metrics = (report.get("policies") or {}).get(name) or {}
    if d is not None:
        key = "true_value" if d["metric"] == "true_value" else "dr"
        label = "true value (exact expected play rate, demo world)" if key == "true_value" else "DR estimate"
        lines.append(f"- Policy value, {label}: {format_estimate(metrics.get(key))} vs production {d['b']:.3f}.")
        significant = d["verdict"] != "no evidence"
        lines.append(f"- Lift vs production: {format_estimate(d['lift'], pct=True)} (95% bootstrap interval over pairs): "
                     + ("significant, the interval excludes 0." if significant
                        else "not significant, the interval includes 0."))
    if metrics.get("hit_rate_uniform"):
        lines.append(f"- Hit rate on the uniformly-logged slice: {format_estimate(metrics['hit_rate_uniform'])}.")
    return lines


def update_model_cards(report: dict, preds: dict[str, str | Path], report_dir: str | Path) -> list[Path]:
    """Write each scored model's headline lines into its card; returns the cards written."""
    from mmart.model.card import set_results

    written = []
    for name, path in preds.items():
        record = read_record(path) or {}
        folder = record.get("model_dir")
        if not folder:
            continue  # predictions from elsewhere (or an older mmart): no model folder to annotate
        if model_fingerprint(folder) != (record.get("inputs") or {}).get("model"):
            say(f"[mmart eval] {folder} changed since {path} was scored: its model card keeps its old results")
            continue
        written.append(set_results(folder, headline_lines(report, name, report_dir)))
        say(f"[mmart eval] headline numbers of {name} written into {written[-1]}")
    return written
