"""Vision fixtures: the registered tiny tower with a seeded random init (never downloaded), small shards."""

from __future__ import annotations

import pytest
import torch

from mmart.vision.config import CacheConfig, VisionConfig


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from 2 threads, and lose many times over when another process holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vision_cfg() -> VisionConfig:
    return VisionConfig(checkpoint=None, init_seed=0)


@pytest.fixture(scope="session")
def tower(vision_cfg):
    from mmart.vision.tower import load_tower

    return load_tower(vision_cfg)


@pytest.fixture
def cache_cfg() -> CacheConfig:
    # 72 tiny-world artworks -> 5 shards of <= 16, batches of 8: resume and shard boundaries get exercised.
    return CacheConfig(batch_size=8, shard_size=16, num_workers=0, device="cpu", cpu_threads=1)
