"""Which decisions get a rationale, and the target each justifies: SFT's own, by SFT's own functions.

SFT learns, per decision, the teacher's choice distribution (``sft.teacher``) and, where the
decision was played, the played artwork. A rationale justifies one candidate: the teacher's top
choice when SFT distils a teacher (the argmax of ``teacher_targets``), else the played artwork
(decisions without a play then teach SFT nothing, and get no rationale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmart.examples import Example


@dataclass
class Target:
    """A decision and the candidate (index into ``example.candidates``) its rationale justifies."""

    example: Example
    index: int
    source: str  # "teacher:<kind>" or "played"

    @property
    def artwork_id(self) -> str:
        return self.example.candidates[self.index]


def sft_targets(cfg, builder, teacher=None) -> list[Target]:
    """SFT's decisions (``sft_examples``) with their targets. ``teacher``: SFT's teacher, already fit
    (``fit_teacher(contract, cfg.sft.teacher)``); required when ``sft.teacher`` is not none."""
    from mmart.train.data import teacher_targets
    from mmart.train.sft import sft_examples

    kind = cfg.sft.teacher
    if kind != "none" and teacher is None:
        raise ValueError(f"sft.teacher is {kind}: pass the fitted teacher")
    out = []
    for ex in sft_examples(cfg, builder):
        if kind != "none":
            out.append(Target(ex, int(np.argmax(teacher_targets(teacher, ex, cfg.sft.teacher_temperature))),
                              f"teacher:{kind}"))
        elif ex.answer is not None:
            out.append(Target(ex, ex.answer, "played"))
    return out
