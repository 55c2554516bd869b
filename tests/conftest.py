"""Shared fixtures: a tiny generated world (seconds), built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _no_global_state_left_behind():
    """Whatever a test (or the mmart code it calls) sets in process-wide state is undone when it ends.

    Library module globals outlive a test: a ``HfTrainerDeepSpeedConfig`` that one test built (even a half-built
    one kept alive by a failure's traceback) stays registered in transformers' module-level weak reference, and
    every later model load in the process then takes the ZeRO path. Environment variables (``ACCELERATE_*``,
    ``DS_ACCELERATOR``, ``TRANSFORMERS_SDPA_FORCE_GQA``, ``MASTER_PORT``) and torch's thread count leak the same
    way, so test outcomes would depend on their order.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    env = dict(os.environ)
    threads = torch.get_num_threads()
    ds_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    yield
    hf_deepspeed._hf_deepspeed_config_weak_ref = ds_ref
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
