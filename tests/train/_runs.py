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
    """The trainable-weights digest each rank reported, by rank, from the stage's one digest line
    (``... sha256 <d> (same on all N ranks)`` or ``(1 process)``); asserts the line appears once."""
    lines = re.findall(rf"\[mmart {stage}\] trainable weights sha256 (\w+) \((?:same on all (\d+) ranks|1 process)\)",
                       text)
    assert len(lines) == 1, f"expected one [mmart {stage}] digest line, got {len(lines)}"
    digest, ranks = lines[0]
    return dict.fromkeys(range(int(ranks or 1)), digest)
