"""Fixtures of the rationale tests: the smoke config on the tiny world, and a tiny random chat LM folder."""

from __future__ import annotations

import pytest
import torch

from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
from mmart.model.testing import save_tiny_llm

# Short enough for the tiny LLM's 512 positions; every field of the decision but the history.
TINY_TEMPLATE = "{title}\n{candidates}\nWhy {target}?"


@pytest.fixture(scope="session")
def tiny_teacher_llm(tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("teacher") / "tiny-llama")


@pytest.fixture
def rcfg(tiny_world, tmp_path, tiny_teacher_llm) -> PipelineConfig:
    """SFT's default recipe (every logged pair, the taste teacher's targets) on the tiny world, 24 decisions."""
    return load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [
        f"data_dir={tiny_world}", f"output_dir={tmp_path / 'run'}", "sft.examples=pairs", "sft.teacher=taste",
        "sft.max_examples=24", f"rationale.model={tiny_teacher_llm}", f"rationale.template={TINY_TEMPLATE!r}",
        "rationale.max_new_tokens=6", "rationale.shard_size=5", "rationale.batch_size=3"])


@pytest.fixture
def one_thread():
    """One torch thread, as each launched process has (OMP_NUM_THREADS=1): float reductions in the same order, and
    a tiny model's generation is not slowed down by threads waiting on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
