"""scripts/teacher_projection.py: a model made of the teacher's features projects onto itself; noise does not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmart.artefacts import read_record
from mmart.data.contract import load_contract
from mmart.eval.teacher import fit_teacher

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "teacher_projection.py"


@pytest.fixture(scope="module")
def projection():
    spec = importlib.util.spec_from_file_location("teacher_projection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["teacher_projection"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("teacher_projection", None)


def _preds(contract, scores) -> pd.DataFrame:
    """A predictions frame over the test pairs, candidate probabilities = softmax(scores(user, candidates))."""
    imps = contract.frame("impressions")
    arts = contract.frame("artworks")
    by_title = arts.groupby("title_id").artwork_id.apply(list)
    test = imps[imps.split == "test"].drop_duplicates(["user_id", "title_id"]).head(150)
    rows = []
    for r in test.itertuples():
        cands = list(by_title[r.title_id])
        s = np.asarray(scores(r.user_id, cands), dtype=float)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        rows.append({"impression_id": r.impression_id, "user_id": r.user_id, "title_id": r.title_id,
                     "candidates": cands, "probs": p.tolist(), "choice": cands[int(p.argmax())],
                     "choice_prob": float(p.max()), "shown_artwork_id": r.shown_artwork_id})
    assert rows
    return pd.DataFrame(rows)


def test_a_teacher_shaped_model_is_its_own_projection_and_noise_is_not_explained(projection, tiny_world):
    contract = load_contract(tiny_world, check=False)
    teacher = fit_teacher(contract, "taste")
    rng = np.random.default_rng(0)
    w = rng.normal(size=len(teacher.choice_weights) + 1)

    def linear(user, cands):
        x, _ = projection.features(teacher, pd.DataFrame({"user_id": [user], "candidates": [cands]}))
        return (x @ w)[0][: len(cands)]

    exact = _preds(contract, linear)
    out, r2, fitted = projection.project(teacher, exact, l2=1e-9)
    assert r2 > 0.999
    assert list(out.choice) == list(exact.choice)
    np.testing.assert_allclose(np.concatenate(out.probs.to_list()), np.concatenate(exact.probs.to_list()), atol=1e-4)
    np.testing.assert_allclose(fitted, w, atol=1e-3)

    noise = _preds(contract, lambda user, cands: rng.normal(size=len(cands)))
    out, r2, _ = projection.project(teacher, noise)
    assert r2 < 0.3
    for probs, cands, choice in zip(out.probs, out.candidates, out.choice):
        assert len(probs) == len(cands) and abs(sum(probs) - 1) < 1e-6 and choice == cands[int(np.argmax(probs))]


def test_cli_writes_one_projected_file_per_prediction(projection, tiny_world, tmp_path, capsys):
    contract = load_contract(tiny_world, check=False)
    rng = np.random.default_rng(1)
    path = tmp_path / "m.parquet"
    _preds(contract, lambda user, cands: rng.normal(size=len(cands))).to_parquet(path)
    assert projection.main(["--data", str(tiny_world), "--pred", f"m={path}", "--out", str(tmp_path / "out")]) == 0
    assert "teacher features explain" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "out" / "m.parquet")) == len(pd.read_parquet(path))
    record = read_record(tmp_path / "out" / "m.parquet")
    assert record["stage"] == "teacher_projection" and record["inputs"]["predictions"] and 0 <= record["explained"] <= 1
    with pytest.raises(SystemExit, match="NAME=PATH"):
        projection.main(["--data", str(tiny_world), "--pred", str(path), "--out", str(tmp_path / "out")])
