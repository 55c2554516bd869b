"""``mmart eval`` on the tiny world with stand-in prediction files: every policy, paired differences, the
new-title slice, verdicts, config and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mmart.cli import main
from mmart.config import CONFIG_ROOT
from mmart.errors import UserError
from mmart.eval.report import evaluate, parse_diff


def _preds(world, scores_of, pairs=None) -> pd.DataFrame:
    """A predictions file as `mmart predict` writes it (the columns eval reads), one row per test pair."""
    oracle = pd.read_parquet(world / "oracle.parquet")
    oracle = oracle[oracle.split == "test"]
    rows = []
    for (u, t), g in oracle.groupby(["user_id", "title_id"], sort=True):
        if pairs is not None and (u, t) not in pairs:
            continue
        s = np.asarray(scores_of(g), dtype=float)
        p = np.exp(s - s.max())
        rows.append({"user_id": u, "title_id": t, "candidates": list(g.artwork_id), "probs": list(p / p.sum())})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """A run folder: pipeline.yaml beside preds/, three stand-in models scored on the same test pairs."""
    root = tmp_path_factory.mktemp("run")
    (root / "preds").mkdir()
    rng = np.random.default_rng(0)
    _preds(tiny_world, lambda g: 50 * g.p_taste).to_parquet(root / "preds" / "taste.parquet")
    _preds(tiny_world, lambda g: 50 * g.production_prob).to_parquet(root / "preds" / "prod-like.parquet")
    _preds(tiny_world, lambda g: rng.normal(size=len(g))).to_parquet(root / "preds" / "noise.parquet")
    # As scripts/train.sh saves it: `mmart config` output, resolved, with the derived cache_dir.
    (root / "pipeline.yaml").write_text("output_dir: somewhere/else\nsft:\n  teacher: reward_model\n"
                                        "cache_dir: somewhere/else/cache\n")
    return root


@pytest.fixture(scope="module")
def report(tiny_world, run):
    preds = {n: run / "preds" / f"{n}.parquet" for n in ("taste", "prod-like", "noise")}
    return evaluate(tiny_world, preds, run / "eval", n_boot=200, diffs=["taste-prod-like", "taste - noise"],
                    teachers=["reward_model", "taste"])


def test_every_policy_with_the_taste_oracle_and_the_teachers(report):
    pols = report["policies"]
    assert {"taste", "prod-like", "noise", "teacher_reward_model", "teacher_taste", "production", "popularity",
            "random", "taste_oracle", "oracle"} == set(pols)
    assert pols["taste_oracle"]["true_value"]["value"] <= pols["oracle"]["true_value"]["value"]
    # A model that chooses as the taste oracle closes all of the gap to it, and the same policy twice agrees.
    assert pols["taste"]["gap_closed_taste"]["value"] == pytest.approx(1.0)
    assert pols["taste"]["true_value"] == pols["taste_oracle"]["true_value"]
    assert pols["prod-like"]["true_value"] == pols["production"]["true_value"]


def test_paired_differences(report):
    d = report["differences"]
    assert list(d) == ["taste - production", "prod-like - production", "noise - production", "taste - prod-like",
                       "taste - noise"]
    same = d["prod-like - production"]  # the same choices: exactly 0 in every resample
    assert same["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0} and same["verdict"] == "no evidence"
    better = d["taste - production"]
    tv = report["policies"]
    assert better["difference"]["value"] == pytest.approx(
        tv["taste"]["true_value"]["value"] - tv["production"]["true_value"]["value"])
    assert better["lift"] == tv["taste"]["lift"]  # the lift column is this paired comparison
    assert better["verdict"] == "better" and better["metric"] == "true_value" and better["pairs"] == report["pairs"]


def test_report_opens_with_one_verdict_line_per_model(report, run):
    md = (run / "eval" / "report.md").read_text().splitlines()
    assert md[2].startswith("- **taste: better than production, lift +")
    assert "of the gap to the taste oracle" in md[2]
    assert md[3].startswith("- **prod-like: no evidence of a difference from production")
    assert md[4].startswith("- **noise: ")
    assert "## Paired differences" in md and any(line.startswith("| taste - noise (true value)") for line in md)
    for png in ("policy_values.png", "estimators_vs_truth.png"):
        assert (run / "eval" / png).stat().st_size > 10_000


def test_new_title_slice(report, tiny_world):
    held = set(json.loads((tiny_world / "new_titles.json").read_text())["title_ids"])
    oracle = pd.read_parquet(tiny_world / "oracle.parquet")
    on_held = oracle[(oracle.split == "test") & oracle.title_id.isin(held)]
    new = report["new_titles"]
    assert new["pairs"] == on_held.groupby(["user_id", "title_id"]).ngroups > 0 and new["titles"] == len(held)
    best = on_held.groupby(["user_id", "title_id"]).p_play.max().mean()
    assert new["policies"]["oracle"]["true_value"]["value"] == pytest.approx(best)
    assert "lift" in new["policies"]["taste"] and "lift" not in new["policies"]["production"]


def test_resolved_config_from_the_run_folder(report, run, tiny_world):
    assert report["config_source"] == str(run / "pipeline.yaml")
    assert report["config"]["output_dir"] == "somewhere/else"
    assert report["config"]["sft"]["teacher"] == "reward_model" and "lr" in report["config"]["sft"]  # resolved
    assert report["config"]["cache_dir"] == "somewhere/else/cache"
    # A config as written by hand (sections included from files) is resolved too.
    by_hand = evaluate(tiny_world, {"taste": run / "preds" / "taste.parquet"}, run / "eval4", n_boot=20,
                       config=CONFIG_ROOT / "smoke.yaml")
    assert by_hand["config"]["world"]["num_titles"] == 24 and by_hand["config_source"].endswith("smoke.yaml")
    # Without --teacher, the teacher shown is the one the run's SFT distilled.
    again = evaluate(tiny_world, {"taste": run / "preds" / "taste.parquet"}, run / "eval2", n_boot=20)
    assert again["teachers"] == ["reward_model"] and "teacher" in again["policies"]
    given = evaluate(tiny_world, {"taste": run / "preds" / "taste.parquet"}, run / "eval3", n_boot=20,
                     config={"sft": {"teacher": "none"}})
    assert given["config"] == {"sft": {"teacher": "none"}} and given["teachers"] == ["taste"]


def test_parse_diff_handles_dashed_names():
    names = ["model", "text-only", "production"]
    assert parse_diff("model-text-only", names) == ("model", "text-only")
    assert parse_diff("text-only - production", names) == ("text-only", "production")
    with pytest.raises(UserError, match="expected A-B with A and B among the policies model, text-only"):
        parse_diff("model-sft", names)


def test_different_pair_sets_are_refused(tiny_world, run, tmp_path):
    full = pd.read_parquet(run / "preds" / "taste.parquet")
    full.iloc[: len(full) // 2].to_parquet(tmp_path / "half.parquet")
    with pytest.raises(UserError) as e:
        evaluate(tiny_world, {"a": run / "preds" / "taste.parquet", "b": tmp_path / "half.parquet"}, tmp_path / "o")
    msg = str(e.value)
    assert "\n" not in msg and "half.parquet" in msg and "same pairs" in msg


def test_missing_or_corrupt_predictions_are_one_line_errors(tiny_world, tmp_path, capsys):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    for path, expect in ((tmp_path / "missing.parquet", "no such file"), (bad, "not a readable Parquet file")):
        code = main(["eval", "--data", str(tiny_world), "--pred", f"model={path}", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1
        assert f"--pred model={path}: {expect}" in err


def test_predictions_of_another_dataset_are_refused(tiny_world, run, tmp_path):
    other = pd.read_parquet(run / "preds" / "taste.parquet")
    other["user_id"] = other.user_id + "x"
    other.to_parquet(tmp_path / "other.parquet")
    with pytest.raises(UserError, match=r"are not test pairs of .*mmart predict --data"):
        evaluate(tiny_world, {"m": tmp_path / "other.parquet"}, tmp_path / "o")
