"""DPO's teacher pairs: the teacher's top candidate over those it ranks at least the margin lower."""

from __future__ import annotations

import numpy as np

from mmart.examples import Example
from mmart.train.dpo import teacher_pairs


class _Teacher:
    """P(play) read from a table, as a fitted teacher's ``predict`` gives it."""

    def __init__(self, table: dict[str, float]):
        self.table = table

    def predict(self, user_ids, artwork_ids):
        return np.array([self.table[a] for a in artwork_ids])


def _example(i: int, candidates: list[str]) -> Example:
    return Example(f"e{i}", "u1", f"t{i}", "train", i, candidates)


def test_the_top_is_paired_only_against_candidates_strictly_and_far_enough_below() -> None:
    logit = {"a": 1.0, "b": 0.8, "c": -1.0, "d": 0.5, "e": 0.5}
    teacher = _Teacher({k: 1 / (1 + np.exp(-v)) for k, v in logit.items()})
    any_lower = teacher_pairs([_example(0, ["b", "a", "c"]), _example(1, ["d", "e"])], teacher, margin=0.0)
    assert [(ex.answer, ex.rejected) for ex in any_lower] == [(1, [0, 2])]  # d and e tie: nothing to prefer
    far_lower = teacher_pairs([_example(0, ["b", "a", "c"]), _example(1, ["d", "e"])], teacher, margin=0.5)
    assert [(ex.answer, ex.rejected) for ex in far_lower] == [(1, [2])]  # b is 0.2 below a; d-e has none that far
