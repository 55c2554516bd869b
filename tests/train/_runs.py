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
    return {int(r): d for r, d in re.findall(rf"\[mmart {stage}\] rank (\d+) trainable weights sha256 (\w+)", text)}
