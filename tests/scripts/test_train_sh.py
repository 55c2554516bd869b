"""scripts/train.sh on a dataset folder that `mmart world` did not write: used as it is, never overwritten."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_sh_uses_your_own_dataset_as_it_is(world_copy, tmp_path):
    """A data_dir without world_summary.json is the user's catalog: the world stage leaves it alone and the
    pipeline goes on to validate it (here it stops there: a table is missing)."""
    (world_copy / "world_summary.json").unlink()  # not written by `mmart world`: a catalog of one's own
    (world_copy / "users.parquet").unlink()
    images = sorted(p.name for p in (world_copy / "images").iterdir())
    config = tmp_path / "mine.yaml"
    config.write_text(f"inherit: smoke.yaml\ndata_dir: {world_copy}\noutput_dir: {tmp_path / 'out'}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["bash", "scripts/train.sh", str(config)], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 1
    assert "used as it is" in run.stdout
    assert "users.parquet" in run.stderr and "file is missing" in run.stderr  # validate's message
    assert "not a world written by mmart" not in run.stderr
    assert not (world_copy / "world_summary.json").exists()  # no world was generated into it
    assert sorted(p.name for p in (world_copy / "images").iterdir()) == images
    assert not (world_copy / "users.parquet").exists()
