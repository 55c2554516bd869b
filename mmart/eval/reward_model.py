"""The doubly robust estimator's reward model: logistic regression on simple features, fit on train.

DR corrects a reward model's estimate with importance-weighted residuals; the better the
model, the smaller the variance of that correction. Per (member, title, artwork):

* the artwork's smoothed train play rate (log-odds): what works for everyone;
* the title's smoothed train play rate (log-odds): how playable the title is at all;
* the member's smoothed train play rate (log-odds): how much this member plays;
* tag affinity: the share of the artworks the member played from in their history that
  carry each of this artwork's tags, averaged over its tags (0 when the data has no tags):
  what this member has been drawn in by before.

Fit by Newton's method (IRLS) with a small L2 penalty on the train impressions; a handful
of features and ~10^5 rows take well under a second. No data of the evaluated split is used.
While fitting, each row's rates leave out its own member-title pair's impressions: a rate
that contains the row's own outcome would make the model trust it far too much.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mmart.data.contract import Contract

FEATURES = ("artwork_rate", "title_rate", "member_rate", "tag_affinity")


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Weights ``[F + 1]`` (intercept last) of an L2-penalised logistic regression, by Newton's method."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x1.shape[1])
    penalty = np.full(x1.shape[1], l2 * len(x1))
    penalty[-1] = 0.0  # the intercept is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x1 @ w)))
        grad = x1.T @ (p - y) + penalty * w
        hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < tol:
            break
    return w


@dataclass
class RewardModel:
    """Predicts P(play | member, artwork shown) from the features above."""

    weights: np.ndarray
    artwork_rate: dict[str, float]
    title_rate: dict[str, float]
    member_rate: dict[str, float]
    prior: float
    tags: dict[str, list[str]]
    member_tags: dict[str, Counter]
    member_plays: dict[str, int]
    title_of: dict[str, str]
    kind: str = "reward_model"  # its name among the teachers (mmart/eval/teacher.py)

    def features(self, user_ids, artwork_ids) -> np.ndarray:
        rows = []
        for u, a in zip(user_ids, artwork_ids):
            tags = self.tags.get(a) or []
            n = self.member_plays.get(u, 0)
            counts = self.member_tags.get(u)
            affinity = float(np.mean([counts[t] / n for t in tags])) if tags and n and counts else 0.0
            rows.append((self.artwork_rate.get(a, self.prior), self.title_rate.get(self.title_of.get(a), self.prior),
                         self.member_rate.get(u, self.prior), affinity))
        f = np.asarray(rows, dtype=float).reshape(-1, len(FEATURES))
        f[:, :3] = _logit(np.clip(f[:, :3], 1e-4, 1 - 1e-4))
        return f

    def predict(self, user_ids, artwork_ids) -> np.ndarray:
        x1 = np.hstack([self.features(user_ids, artwork_ids), np.ones((len(user_ids), 1))])
        return 1.0 / (1.0 + np.exp(-(x1 @ self.weights)))

    def table(self, user_ids, candidates, width: int) -> np.ndarray:
        """``[P, width]`` expected play per (pair, candidate), 0 past a pair's own candidates (DR's q_hat)."""
        q = np.zeros((len(candidates), width))
        for i, (u, cands) in enumerate(zip(user_ids, candidates)):
            q[i, : len(cands)] = self.predict([u] * len(cands), cands)
        return q


STRENGTH = {"shown_artwork_id": 2.0, "title_id": 2.0, "user_id": 5.0}  # pseudo-counts of the prior


def smoothed_rate(frame: pd.DataFrame, key: str, prior: float) -> dict[str, float]:
    """Play rate per ``key`` with ``STRENGTH[key]`` pseudo-impressions at ``prior``."""
    g = frame.groupby(key).played.agg(["sum", "count"])
    return ((g["sum"] + STRENGTH[key] * prior) / (g["count"] + STRENGTH[key])).to_dict()


def _leave_pair_out_rate(frame: pd.DataFrame, key: str, prior: float) -> np.ndarray:
    """Per row: the smoothed rate of its ``key`` without the impressions of its own (member, title) pair."""
    y = frame.played.astype(float)
    total = frame.groupby(key).played.transform("sum").astype(float)
    count = frame.groupby(key).played.transform("count").astype(float)
    pair_sum = y.groupby([frame.user_id, frame.title_id]).transform("sum")
    pair_count = y.groupby([frame.user_id, frame.title_id]).transform("count")
    return ((total - pair_sum + STRENGTH[key] * prior) / (count - pair_count + STRENGTH[key])).to_numpy()


def fit_reward_model(contract: Contract, split: str = "train", l2: float = 1e-3) -> RewardModel:
    """Fit on ``split``'s impressions (train: the evaluated split is never seen)."""
    imps = contract.frame("impressions")
    train = imps[imps.split == split]
    arts = contract.frame("artworks")
    tags = {a: list(t) for a, t in zip(arts.artwork_id, arts["tags"])} if "tags" in arts else {}
    member_tags: dict[str, Counter] = defaultdict(Counter)
    member_plays: dict[str, int] = defaultdict(int)
    users = contract.frame("users")
    for uid, history in zip(users.user_id, users.history):
        for ev in history:
            a = ev.get("artwork_id")
            if a is not None:
                member_plays[uid] += 1
                member_tags[uid].update(tags.get(a, []))
    prior = float(train.played.mean()) if len(train) else 0.5
    model = RewardModel(
        weights=np.zeros(len(FEATURES) + 1),
        artwork_rate=smoothed_rate(train, "shown_artwork_id", prior),
        title_rate=smoothed_rate(train, "title_id", prior),
        member_rate=smoothed_rate(train, "user_id", prior),
        prior=prior, tags=tags, member_tags=dict(member_tags), member_plays=dict(member_plays),
        title_of=dict(zip(arts.artwork_id, arts.title_id)),
    )
    x = model.features(train.user_id, train.shown_artwork_id)
    for j, key in enumerate(("shown_artwork_id", "title_id", "user_id")):
        x[:, j] = _logit(np.clip(_leave_pair_out_rate(train, key, prior), 1e-4, 1 - 1e-4))
    model.weights = fit_logistic(x, train.played.to_numpy(dtype=float), l2)
    return model


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())
