"""How much of a model's choice is its teacher's signal, and what is the rest worth?

Run as: python scripts/teacher_projection.py --data data/world --pred sft=outputs/default/preds/sft.parquet --out outputs/projection
then:   mmart eval --data data/world --pred sft=outputs/default/preds/sft.parquet sft_projected=outputs/projection/sft.parquet --diff sft_projected-sft --out outputs/projection/eval

For each predictions file of `mmart predict` it fits a conditional logit of the model's own choice probabilities
(never an outcome) on the taste teacher's candidate features (mmart.eval.teacher: the member-by-look interactions
and the artwork's play rate, the teacher refit on the train logs), prints how much of the variance of the model's
pair-centred log-probabilities those features explain and the fitted weights, and writes OUT/NAME.parquet: the
same pairs, each candidate's probability now the fit's (and NAME.made_from.json: the data's and the predictions'
fingerprints, the fit). Scoring that file beside the model's tells whether the
model misses the teacher's signal (the projection is no better than the model) or carries it plus something that
costs (the projection is better): on the default world every SFT model tried projects to about its teacher's
value while scoring below it (docs/experiments.md). Pairs whose title has fewer candidates than the widest are kept
(padding is masked). Seconds per file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from mmart.artefacts import data_fingerprint, sha256_files, write_record
from mmart.data.contract import load_contract
from mmart.errors import UserError
from mmart.eval.teacher import (TasteTeacher, candidate_features, feature_names, fit_soft_conditional_logit,
                                fit_teacher)

L2 = 1e-3  # per pair: keeps the fit finite where a model's probabilities are near 0 or 1


def features(teacher: TasteTeacher, preds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K, F]`` teacher features of every scored candidate (F: the taste features, then the artwork's rate
    logit) and the ``[N, K]`` mask of real candidates."""
    width = int(preds.candidates.map(len).max())
    cand = np.full((len(preds), width), -1)
    for i, cs in enumerate(preds.candidates):
        cand[i, : len(cs)] = teacher._art(list(cs))
    x = candidate_features(teacher._profiles(list(preds.user_id)), teacher.cat, cand)
    users = [u for u, cs in zip(preds.user_id, preds.candidates) for _ in cs]
    flat = [a for cs in preds.candidates for a in cs]
    rate = np.zeros((len(preds), width))
    rate[cand >= 0] = teacher._rate_features(users, flat, teacher._art(flat))[:, 0]
    return np.concatenate([x, rate[..., None]], -1), cand >= 0  # padding rows are 0 in both


def explained(x: np.ndarray, mask: np.ndarray, log_p: np.ndarray) -> float:
    """R^2 of the pair-centred log-probabilities on the pair-centred features (least squares)."""
    m = mask.astype(float)
    count = m.sum(1, keepdims=True)
    xc = x - (x * m[..., None]).sum(1, keepdims=True) / count[..., None]
    yc = log_p - np.where(mask, log_p, 0.0).sum(1, keepdims=True) / count
    xs, y = xc[mask], yc[mask]
    beta = np.linalg.lstsq(xs, y, rcond=None)[0]
    return float(1 - ((y - xs @ beta) ** 2).sum() / (y ** 2).sum())


def project(teacher: TasteTeacher, preds: pd.DataFrame, l2: float = L2) -> tuple[pd.DataFrame, float, np.ndarray]:
    """The predictions with each candidate's probability replaced by the teacher-feature fit of the model's own
    probabilities (L2 ``l2`` per pair); the features' R^2 over the model's log-probabilities; the fitted weights."""
    x, mask = features(teacher, preds)
    q = np.zeros(mask.shape)
    for i, p in enumerate(preds.probs):
        q[i, : len(p)] = np.asarray(p, dtype=float)
    q = q / q.sum(1, keepdims=True)
    w = fit_soft_conditional_logit(x, mask, q, l2, steps=50)
    s = np.where(mask, x @ w, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = preds.copy()
    out["probs"] = [row[: len(c)].tolist() for row, c in zip(p, preds.candidates)]
    best = p.argmax(1)
    out["choice"] = [c[b] for c, b in zip(preds.candidates, best)]
    out["choice_prob"] = p.max(1)
    if "shown_artwork_id" in out:
        out["shown_prob"] = [row[list(c).index(a)] if a in list(c) else np.nan
                             for row, c, a in zip(p, preds.candidates, out.shown_artwork_id)]
    r2 = explained(x, mask, np.log(np.clip(q, 1e-12, None)))
    return out, r2, w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 epilog="Example: python scripts/teacher_projection.py --data data/world "
                                        "--pred sft=outputs/default/preds/sft.parquet --out outputs/projection")
    ap.add_argument("--data", required=True, help="the dataset folder the predictions were made on")
    ap.add_argument("--pred", nargs="+", required=True, metavar="NAME=PATH", help="predictions from `mmart predict`")
    ap.add_argument("--out", required=True, help="folder for NAME.parquet, the projected predictions")
    args = ap.parse_args(argv)
    files = {}
    for item in args.pred:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"--pred {item!r}: expected NAME=PATH to an existing predictions file")
        files[name] = path
    try:
        teacher = fit_teacher(load_contract(args.data), "taste")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        names = feature_names(teacher.cat) + ["artwork_rate"]
        for name, path in files.items():
            preds = pd.read_parquet(path)
            projected, r2, w = project(teacher, preds)
            target = out / f"{name}.parquet"
            projected.to_parquet(target, index=False)
            write_record(target, {"stage": "teacher_projection", "config": {"teacher": "taste", "l2": L2},
                                  "inputs": {"data": data_fingerprint(args.data),
                                             "predictions": sha256_files([Path(path)])[:16]},
                                  "explained": r2, "weights": dict(zip(names, map(float, w)))})
            agree = float(np.mean([a == b for a, b in zip(projected.choice, preds.choice)]))
            print(f"{name}: teacher features explain {r2:.1%} of its log-probabilities; the projection chooses as "
                  f"the model on {agree:.1%} of {len(projected)} rows -> {target}")
            print("  weights: " + ", ".join(f"{n} {v:+.2f}" for n, v in zip(names, w)))
    except UserError as e:
        raise SystemExit(f"teacher_projection: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
