"""Percentile bootstrap over groups (member-title pairs): every reported number gets a 95% interval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


def format_estimate(est: dict | None, pct: bool = False, sign: bool = True) -> str:
    """An ``Estimate.as_dict()`` as ``value [low, high]`` (``pct``: in percent, signed unless ``sign`` is off); ``-`` if None."""
    if not est:
        return "-"
    f = (lambda x: f"{100 * x:{'+' if sign else ''}.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(est['value'])} [{f(est['low'])}, {f(est['high'])}]"


def bootstrap(statistic: Callable[[np.ndarray], float], groups: np.ndarray, n_boot: int = 1000,
              level: float = 0.95, seed: int = 0) -> Estimate:
    """Resample whole groups with replacement; ``statistic(row_indices)`` computes the number.

    ``groups`` labels each row with its group (e.g. a member-title pair id), so the
    rows of one pair stay together and the interval reflects pair-level uncertainty.
    """
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped: group g's rows are order[start[g]: start[g] + count[g]]
    count = np.bincount(inverse)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    rng = np.random.default_rng(seed)
    point = float(statistic(np.arange(len(groups))))
    stats = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        # The picked groups' rows, in pick order (a vectorised concatenate of their row lists).
        n = count[pick]
        offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        stats[b] = statistic(order[np.repeat(start[pick], n) + offset])
    alpha = (1 - level) / 2
    # A resample where the statistic is undefined (SNIPS with no overlap: NaN) is left out, not allowed
    # to make the whole interval NaN; all of them undefined gives NaN, said as such by the report.
    defined = stats[np.isfinite(stats)]
    if not len(defined):
        return Estimate(point, float("nan"), float("nan"))
    low, high = np.quantile(defined, [alpha, 1 - alpha])
    return Estimate(point, float(low), float(high))
