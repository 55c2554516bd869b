"""``mmart eval --fuse``: the model fused with its teacher is a policy of its own, its weights fit on the val
predictions only; the fit, the report's row and paired difference, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mmart.cli import main
from mmart.data.contract import load_contract
from mmart.eval import fusion as fus
from mmart.eval import policies as pol
from mmart.eval.report import evaluate
from mmart.train.config import SFTStageConfig


def _preds(world, split: str, scores_of) -> pd.DataFrame:
    """Predictions as `mmart predict` writes them: one row per ``split`` impression, the pair's probabilities."""
    oracle = pd.read_parquet(world / "oracle.parquet")
    imps = pd.read_parquet(world / "impressions.parquet")
    per_pair = {}
    for (u, t), g in oracle[oracle.split == split].groupby(["user_id", "title_id"], sort=True):
        s = np.asarray(scores_of(g), dtype=float)
        p = np.exp(s - s.max())
        per_pair[(u, t)] = (list(g.artwork_id), list(p / p.sum()))
    rows = []
    for r in imps[imps.split == split].itertuples(index=False):
        cands, p = per_pair[(r.user_id, r.title_id)]
        rows.append({"impression_id": r.impression_id, "user_id": r.user_id, "title_id": r.title_id,
                     "candidates": cands, "probs": p, "choice": cands[int(np.argmax(p))],
                     "shown_artwork_id": r.shown_artwork_id, "played": bool(r.played),
                     "propensity": float(r.propensity), "split": r.split, "logging_policy": r.logging_policy})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory):
    """A stand-in chooser (the true tastes blurred by noise) scored on the test and the val split."""
    root = tmp_path_factory.mktemp("fuse")
    rng = np.random.default_rng(0)
    model = lambda g: 20 * g.p_taste.to_numpy() + rng.normal(size=len(g))  # noqa: E731
    _preds(tiny_world, "test", model).to_parquet(root / "test.parquet")
    _preds(tiny_world, "val", model).to_parquet(root / "val.parquet")
    return root


@pytest.fixture(scope="module")
def report(tiny_world, files):
    return evaluate(tiny_world, {"model": files / "test.parquet"}, files / "eval", n_boot=50,
                    diffs=["model+teacher-teacher"], fuse=["model"], fuse_val={"model": files / "val.parquet"})


def _synthetic(follow: str, n: int = 3000, k: int = 4, seed: int = 0):
    """Choices drawn from softmax(2 * one feature); the other feature independent noise."""
    rng = np.random.default_rng(seed)
    mask = np.ones((n, k), dtype=bool)
    log_model = fus.log_choice(np.exp(rng.normal(size=(n, k))), mask)
    log_teacher = fus.log_choice(np.exp(rng.normal(size=(n, k))), mask)
    s = 2.0 * (log_model if follow == "model" else log_teacher)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    chosen = np.array([rng.choice(k, p=row) for row in p])
    return log_model, log_teacher, mask, chosen, rng.uniform(0.5, 3.0, n)


def test_the_fit_finds_the_feature_the_choices_follow():
    lm, lt, mask, chosen, w = _synthetic("model")
    a, b = fus.fit_weights(lm, lt, mask, chosen, w)
    assert a == pytest.approx(2.0, abs=0.25) and abs(b) < 0.15
    # Fused with b = 0 the choices are the model's, whatever a > 0 is.
    fused = fus.fused_scores(np.exp(lm), np.full(mask.shape, 0.3), mask, a, 0.0).argmax(1)
    assert (fused == lm.argmax(1)).all()
    a, b = fus.fit_weights(*_synthetic("teacher")[:5])
    assert b == pytest.approx(2.0, abs=0.25) and abs(a) < 0.15


def test_with_b_zero_the_fused_policy_is_the_model(tiny_world, files):
    contract = load_contract(tiny_world, check=False)
    frame = pd.read_parquet(files / "test.parquet")
    es = pol.eval_set(contract, "test", list(dict.fromkeys(zip(frame.user_id, frame.title_id))), None)
    q = np.random.default_rng(0).uniform(0.05, 0.95, es.mask.shape)  # any teacher
    p_model = pol.model_policy(es, frame, greedy=False)
    fused = pol.scores_policy(es, fus.fused_scores(p_model, q, es.mask, 0.7, 0.0))
    assert (fused == pol.model_policy(es, frame)).all()


def test_the_fused_row_its_weights_and_its_paired_difference(report, files):
    pols = list(report["policies"])
    assert pols.index("teacher") < pols.index("model+teacher") < pols.index("production")
    f = report["fusions"]["model+teacher"]
    val = pd.read_parquet(files / "val.parquet")
    assert f["model"] == "model" and f["teacher"] == report["teachers"][0] and f["val"] == str(files / "val.parquet")
    assert f["played_impressions"] == int(val.played.sum()) > 0 and np.isfinite([f["a"], f["b"]]).all()
    assert f["propensity_clip"] == SFTStageConfig.propensity_clip  # weighted as SFT weights its plays
    d = report["differences"]["model+teacher - teacher"]
    tv = report["policies"]
    assert d["difference"]["value"] == pytest.approx(
        tv["model+teacher"]["true_value"]["value"] - tv["teacher"]["true_value"]["value"])
    md = (files / "eval" / "report.md").read_text()
    assert "model+teacher is a fusion, not model alone" in md and f"(a, b) = ({f['a']:.3f}, {f['b']:.3f})" in md
    assert "| model+teacher |" in md and "| model+teacher - teacher (true value) |" in md
    assert "model+teacher" not in report["verdicts"]  # the verdicts are the scored models' own


def test_the_fit_never_reads_the_evaluated_split(tiny_world, world_copy, files, report, tmp_path):
    """Other test outcomes, in the dataset and in the predictions file, leave (a, b) as they were; other val
    outcomes do not."""
    imps = pd.read_parquet(world_copy / "impressions.parquet")
    imps.loc[imps.split == "test", "played"] = ~imps.played[imps.split == "test"]
    imps.to_parquet(world_copy / "impressions.parquet", index=False)
    test = pd.read_parquet(files / "test.parquet")
    test["played"] = ~test.played
    test.to_parquet(tmp_path / "test.parquet")
    again = evaluate(world_copy, {"model": tmp_path / "test.parquet"}, tmp_path / "eval", n_boot=5, fuse=["model"],
                     fuse_val={"model": files / "val.parquet"})
    key = ("a", "b")
    assert [again["fusions"]["model+teacher"][k] for k in key] == [report["fusions"]["model+teacher"][k] for k in key]
    val = pd.read_parquet(files / "val.parquet")
    val["played"] = ~val.played
    val.to_parquet(tmp_path / "val.parquet")
    other = evaluate(tiny_world, {"model": files / "test.parquet"}, tmp_path / "eval2", n_boot=5, fuse=["model"],
                     fuse_val={"model": tmp_path / "val.parquet"})
    assert [other["fusions"]["model+teacher"][k] for k in key] != [report["fusions"]["model+teacher"][k] for k in key]


def test_the_cli_records_the_val_file(tiny_world, files, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["eval", "--data", str(tiny_world), "--pred", f"model={files / 'test.parquet'}", "--out", str(out),
                 "--n-boot", "5", "--fuse", "model", "--fuse-val", f"model={files / 'val.parquet'}",
                 "--diff", "model+teacher-teacher"])
    assert code == 0 and "model+teacher is a fusion" in capsys.readouterr().out
    record = json.loads((out / "made_from.json").read_text())
    assert set(record["inputs"]["fuse_val"]) == {"model"}


@pytest.mark.parametrize("extra, expect", [
    (["--fuse", "model"], "--fuse model needs --fuse-val model=VAL.parquet"),
    (["--fuse", "other", "--fuse-val", "other=VAL"], "--fuse other: not among the --pred names (model)"),
    (["--fuse", "model", "--fuse-val", "model=TEST"], "holds predictions on test, not val"),
    (["--fuse-val", "model=VAL"], "--fuse-val model=...: no --fuse model"),
    (["--fuse", "model", "--fuse-val", "model=VAL", "--split", "val"], "fits its weights on val, the split evaluated"),
])
def test_refusals_are_one_line(tiny_world, files, tmp_path, capsys, extra, expect):
    extra = [e.replace("VAL", str(files / "val.parquet")).replace("TEST", str(files / "test.parquet")) for e in extra]
    code = main(["eval", "--data", str(tiny_world), "--pred", f"model={files / 'test.parquet'}",
                 "--out", str(tmp_path / "o"), "--n-boot", "5", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1 and expect in err
    if "needs --fuse-val" in expect:  # the fix, named
        assert "mmart predict --model" in err and "--split val --out" in err
    assert not (tmp_path / "o" / "report.md").exists()


def test_val_predictions_of_another_model_are_refused(tiny_world, files, tmp_path):
    from mmart.artefacts import write_record
    from mmart.errors import UserError

    for name, model in (("test", "fingerprint-a"), ("val", "fingerprint-b")):
        (tmp_path / f"{name}.parquet").write_bytes((files / f"{name}.parquet").read_bytes())
        write_record(tmp_path / f"{name}.parquet", {"stage": "predict", "inputs": {"model": model},
                                                    "model_dir": f"runs/{model}"})
    with pytest.raises(UserError, match="scored another model than --pred model="):
        evaluate(tiny_world, {"model": tmp_path / "test.parquet"}, tmp_path / "o", n_boot=5, fuse=["model"],
                 fuse_val={"model": tmp_path / "val.parquet"})
    with pytest.raises(UserError, match="mmart predict --model runs/fingerprint-a --data"):  # the fix names the model
        evaluate(tiny_world, {"model": tmp_path / "test.parquet"}, tmp_path / "o", n_boot=5, fuse=["model"])
