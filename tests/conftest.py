"""Shared fixtures: a tiny generated world (seconds), built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmart.config import CONFIG_ROOT, load_config
from mmart.data.world import WorldConfig, generate_world


@pytest.fixture(scope="session")
def tiny_world_cfg() -> WorldConfig:
    return load_config(WorldConfig, CONFIG_ROOT / "world" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_world_cfg) -> Path:
    """A read-only tiny world; copy it (``world_copy``) before changing anything."""
    out = tmp_path_factory.mktemp("tiny_world") / "world"
    generate_world(tiny_world_cfg, out, progress=False)
    return out


@pytest.fixture
def world_copy(tiny_world, tmp_path) -> Path:
    """A private copy of the tiny world that a test may break."""
    dst = tmp_path / "world"
    shutil.copytree(tiny_world, dst)
    return dst
