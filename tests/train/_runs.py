"""Helpers of the training tests that run stages on the tiny world (fixtures: tests/train/conftest.py)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from mmart.config import PipelineConfig


def with_out(c: PipelineConfig, out: Path) -> PipelineConfig:
    """``c`` writing into ``out``, still reading the shared cache."""
    return replace(c, output_dir=str(out), cache=replace(c.cache, dir=c.cache_dir))


def digest_line(text: str, stage: str = "sft") -> dict[int, str]:
    """Rank -> the trainable weights' digest, from the stage's one gathered line (``(same on all N ranks)``
    or ``(1 process)``); ranks that disagree raise in the stage instead of printing."""
    found: dict[int, str] = {}
    for digest, ranks in re.findall(rf"\[mmart {stage}\] trainable weights sha256 (\w+) \((?:same on all (\d+) ranks|1 process)\)",
                                    text):
        found.update({r: digest for r in range(int(ranks or 1))})
    return found
