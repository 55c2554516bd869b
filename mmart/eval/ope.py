"""Off-policy value estimators for logged bandit data (any source, not only mmart's tables).

Inputs are 1-D arrays over logged decisions: ``reward`` (e.g. played, 0/1), ``propensity``
(the logging policy's probability of the logged action, in (0, 1]) and ``target_prob``
(the evaluated policy's probability of that same logged action, in [0, 1]). Each function
returns the estimate as a float.

Inputs must be finite (a NaN or infinite reward, propensity or model prediction is refused
with the index), and ``clip`` must be positive. An estimate that cannot be made is NaN, not
a number that looks like one: SNIPS when the evaluated policy gives zero probability to
every logged action (no overlap: sum of weights 0, as obp's SNIPS returns). Callers that
bootstrap it get a NaN interval, which the report prints as ``nan``.
"""

from __future__ import annotations

import numpy as np

from mmart.errors import UserError


def _arrays(**named) -> dict[str, np.ndarray]:
    out, n = {}, None
    for name, value in named.items():
        if value is None:
            continue
        a = np.asarray(value, dtype=float)
        if a.ndim != 1:
            raise UserError(f"{name} must be a 1-D array, got shape {a.shape}")
        if not np.isfinite(a).all():
            i = int(np.flatnonzero(~np.isfinite(a))[0])
            raise UserError(f"{name} contains {'NaN' if np.isnan(a[i]) else a[i]} at index {i}; "
                            "every value must be a finite number")
        if n is None:
            n = len(a)
        elif len(a) != n:
            lengths = {k: len(np.asarray(v)) for k, v in named.items() if v is not None}
            raise UserError(f"arrays must have equal lengths, got {lengths}")
        out[name] = a
    if n == 0:
        raise UserError("no logged decisions: the arrays are empty")
    p = out.get("propensity")
    if p is not None and ((p <= 0) | (p > 1)).any():
        i = int(np.flatnonzero((p <= 0) | (p > 1))[0])
        raise UserError(f"propensity must be in (0, 1]; index {i} is {p[i]}")
    t = out.get("target_prob")
    if t is not None and ((t < 0) | (t > 1)).any():
        i = int(np.flatnonzero((t < 0) | (t > 1))[0])
        raise UserError(f"target_prob must be in [0, 1]; index {i} is {t[i]}")
    return out


def _check_clip(clip: float | None) -> None:
    if clip is None:
        return
    if isinstance(clip, bool) or not isinstance(clip, (int, float, np.integer, np.floating)) or not clip > 0:
        raise UserError(f"clip must be a positive number (the largest importance weight kept) or None, got {clip!r}")


def importance_weights(propensity, target_prob, clip: float | None = None) -> np.ndarray:
    """pi(a) / p, optionally clipped at ``clip`` > 0 (trades variance for bias)."""
    _check_clip(clip)
    a = _arrays(propensity=propensity, target_prob=target_prob)
    w = a["target_prob"] / a["propensity"]
    return np.minimum(w, clip) if clip is not None else w


def ips(reward, propensity, target_prob, clip: float | None = None) -> float:
    """Inverse propensity scoring: mean(r * pi(a) / p)."""
    r = _arrays(reward=reward)["reward"]
    w = importance_weights(propensity, target_prob, clip)
    if len(r) != len(w):
        raise UserError(f"arrays must have equal lengths, got reward={len(r)}, propensity={len(w)}")
    return float(np.mean(r * w))


def snips(reward, propensity, target_prob, clip: float | None = None) -> float:
    """Self-normalised IPS: sum(r * w) / sum(w).

    NaN when sum(w) is 0: the evaluated policy never takes a logged action (no overlap), so
    the logs say nothing about its value. 0.0 would claim it never gets played.
    """
    r = _arrays(reward=reward)["reward"]
    w = importance_weights(propensity, target_prob, clip)
    if len(r) != len(w):
        raise UserError(f"arrays must have equal lengths, got reward={len(r)}, propensity={len(w)}")
    total = w.sum()
    return float((r * w).sum() / total) if total > 0 else float("nan")


def dr(reward, propensity, target_prob, q_logged, q_target, clip: float | None = None) -> float:
    """Doubly robust: mean(q_target + pi(a)/p * (r - q_logged)).

    ``q_logged`` is the reward model's prediction for the logged action, ``q_target`` its
    expected reward under the evaluated policy (sum over actions of pi(a') * q(a')).
    """
    a = _arrays(reward=reward, q_logged=q_logged, q_target=q_target)
    w = importance_weights(propensity, target_prob, clip)
    if len(a["reward"]) != len(w):
        raise UserError(f"arrays must have equal lengths, got reward={len(a['reward'])}, propensity={len(w)}")
    return float(np.mean(a["q_target"] + w * (a["reward"] - a["q_logged"])))


def effective_sample_size(propensity, target_prob, clip: float | None = None) -> float:
    """(sum w)^2 / sum w^2: how many on-policy samples the weighted estimate is worth."""
    w = importance_weights(propensity, target_prob, clip)
    denom = float((w**2).sum())
    return float(w.sum() ** 2 / denom) if denom > 0 else 0.0
