"""Fabricated predictions for the tiny world: the review stage reads only ``mmart predict`` output."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_preds import fabricate_predictions


@pytest.fixture(scope="session")
def tiny_preds(tiny_world, tmp_path_factory) -> Path:
    """Fabricated test-split predictions for the tiny world, as a Parquet file."""
    path = tmp_path_factory.mktemp("review_preds") / "preds.parquet"
    fabricate_predictions(tiny_world).to_parquet(path, index=False)
    return path
