"""Fixtures of the training tests: an MMART_HOME of their own and the smoke config on the tiny world."""

from __future__ import annotations

import pytest

from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
from mmart.vision.cache import build_cache


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("mmart_home")
    mp.setenv("MMART_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def cfg(tiny_world, tmp_path_factory, home) -> PipelineConfig:
    out = tmp_path_factory.mktemp("run")
    c = load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [
        f"data_dir={tiny_world}", f"output_dir={out}", "sft.max_examples=12", "sft.batch_size=2",
        "sft.save_steps=2", "dpo.max_examples=6", "dpo.batch_size=3", "sft.logging_steps=1"])
    build_cache(tiny_world, c.cache_dir, c.tower, c.cache, progress=False)
    return c
