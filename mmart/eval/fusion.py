"""``NAME+teacher``: a scored model's choice fused with its teacher's, an explicit policy of the report.

On every demo world so far the LLM chooses ~0.015 below its teacher in true value, so whether the two
together beat either is worth measuring, as a policy of its own and never as the LLM's number. It chooses

    argmax_k  a * log p_model(k) + b * log p_teacher(k)

with p_model the model's probabilities (``mmart predict``) and p_teacher the teacher's choice distribution
softmax_k(logit q_k) over the pair's candidates (``mmart.train.data.teacher_targets`` at T = 1; b absorbs any
temperature), q the P(play) whose argmax is the report's teacher row. (a, b) are a conditional logit of the
played artwork on these two features over the played impressions of the same model's predictions on the
val split, each weighted by min(1/propensity, clip) as SFT weights its played labels. They are never fit on
the evaluated split: weights chosen by the evaluated outcomes would be scored on the outcomes that chose them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from mmart.errors import UserError
from mmart.eval.teacher import fit_conditional_logit

PROPENSITY_CLIP = 10.0  # sft.propensity_clip's default: a few rarely shown plays cannot decide the weights
L2 = 1e-3  # small: two weights, hundreds of plays; it only keeps a fit on a handful of plays finite
FLOOR = 1e-12  # a probability that underflowed to 0 counts as this, so its log stays finite
VAL_COLUMNS = ("shown_artwork_id", "played", "propensity", "split")  # besides the columns eval reads


def fused_name(model: str) -> str:
    return f"{model}+teacher"


@dataclass
class Fusion:
    """The fitted weights of one fused policy, and what they were fit on (report.json's ``fusions``)."""

    model: str  # the --pred name fused
    teacher: str  # the teacher kind fused (the report's first teacher)
    a: float  # weight of log p_model
    b: float  # weight of log p_teacher
    val: str  # the --fuse-val predictions file the weights were fit on
    played_impressions: int  # the val impressions fit on
    propensity_clip: float = PROPENSITY_CLIP
    l2: float = L2

    def as_dict(self) -> dict:
        return asdict(self)


def log_choice(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log of ``p [N, K]`` renormalised over each row's candidates (0 on padding)."""
    p = np.where(mask, np.maximum(p, FLOOR), 0.0)
    return np.where(mask, np.log(np.where(mask, p, 1.0)) - np.log(p.sum(1, keepdims=True)), 0.0)


def teacher_log_choice(q: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log softmax_k(logit q_k) over each row's candidates, from the teacher's P(play) ``q [N, K]``."""
    q = np.clip(np.where(mask, q, 0.5), 1e-6, 1 - 1e-6)
    z = np.where(mask, np.log(q) - np.log1p(-q), -np.inf)
    z = z - z.max(1, keepdims=True)
    return np.where(mask, z - np.log(np.exp(z).sum(1, keepdims=True)), 0.0)


def fused_scores(p_model: np.ndarray, q_teacher: np.ndarray, mask: np.ndarray, a: float, b: float) -> np.ndarray:
    """``[N, K]`` a * log p_model + b * log p_teacher: the fused policy chooses their argmax."""
    return a * log_choice(p_model, mask) + b * teacher_log_choice(q_teacher, mask)


def fit_weights(log_model: np.ndarray, log_teacher: np.ndarray, mask: np.ndarray, chosen: np.ndarray,
                weight: np.ndarray | None = None, l2: float = L2) -> tuple[float, float]:
    """(a, b) of P(k) = softmax_k(a * log_model + b * log_teacher) maximising the weighted likelihood of ``chosen``."""
    x = np.stack([np.where(mask, log_model, 0.0), np.where(mask, log_teacher, 0.0)], -1)
    a, b = fit_conditional_logit(x, mask, np.asarray(chosen), l2, steps=50, weight=weight)
    return float(a), float(b)


def fit_fusion(model: str, val: pd.DataFrame, val_path: str, teacher, kind: str) -> Fusion:
    """Fit (a, b) on the played impressions of ``val``, the model's predictions on the val split (checked by the
    caller), with ``teacher`` (fit on train) giving p_teacher. Nothing of any other split is read."""
    where = f"--fuse-val {model}={val_path}"
    missing = [c for c in VAL_COLUMNS if c not in val.columns]
    if missing:
        raise UserError(f"{where}: lacks column(s) {', '.join(missing)}; expected the output of `mmart predict`")
    played = val[val.played.astype(bool)].reset_index(drop=True)
    if played.empty:
        raise UserError(f"{where}: no played impression to fit the fusion weights on; score more val pairs "
                        "(`mmart predict --split val --slice all --max-pairs 0`)")
    cands = [list(c) for c in played.candidates]
    width = max(len(c) for c in cands)
    mask = np.zeros((len(played), width), dtype=bool)
    p_model = np.zeros(mask.shape)
    for i, (c, p) in enumerate(zip(cands, played.probs)):
        mask[i, : len(c)] = True
        p_model[i, : len(c)] = p
    chosen = np.array([c.index(a) for c, a in zip(cands, played.shown_artwork_id)])
    q = teacher.table(list(played.user_id), cands, width)
    w = np.minimum(1.0 / played.propensity.to_numpy(dtype=float), PROPENSITY_CLIP)
    a, b = fit_weights(log_choice(p_model, mask), teacher_log_choice(q, mask), mask, chosen, w / w.mean())
    return Fusion(model, kind, a, b, str(val_path), len(played))
