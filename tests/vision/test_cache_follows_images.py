"""The cache follows its images and trusts no manifest blindly (issue 12: items 3, 4, 9, 13).

A row is kept only while its image's sha256 is the one it was encoded from; load and verify
refuse a cache whose images changed; a manifest whose id order was edited, or that lost
its ``shards``, is refused in one line; a FIFO named ``.png`` is a bad image, not a hang;
a pickled tower checkpoint is refused with the safetensors fix.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import shutil
from fractions import Fraction

import pandas as pd
import pytest
import torch

from mmart.cli import main
from mmart.config import CONFIG_ROOT
from mmart.errors import UserError
from mmart.vision.cache import build_cache
from mmart.vision.config import VisionConfig
from mmart.vision.store import ArtworkCache, CacheError, verify_cache

RANDOM_TOWER = ["vision.checkpoint=null", "cache.shard_size=16", "cache.num_workers=0", "cache.cpu_threads=1"]


class Hung(BaseException):
    """Not an Exception: code that catches OSError (or everything) around an open() cannot swallow it."""


@pytest.fixture
def no_hang():
    """Fail (instead of blocking forever) if the code under test blocks, e.g. opening a FIFO with no writer."""
    def _raise(*_):
        signal.alarm(5)  # again, in case something swallowed this one
        raise Hung("blocked for 30 s (opened a FIFO?)")
    before = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


def _paths(world):
    frame = pd.read_parquet(world / "artworks.parquet")
    return list(frame["artwork_id"]), dict(zip(frame["artwork_id"], frame["path"]))


def _replace_image(world, target: str, source: str) -> None:
    """New pixels for ``target`` (another artwork's), same id and path: what regenerating a world does."""
    ids, path = _paths(world)
    shutil.copyfile(world / path[source], world / path[target])


def test_changed_image_is_encoded_again_not_kept(world_copy, tmp_path, tower, vision_cfg, cache_cfg):
    build_cache(world_copy, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    ids, _ = _paths(world_copy)
    _replace_image(world_copy, ids[20], ids[60])  # shard 1 holds rows 16-31
    r = build_cache(world_copy, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    assert (r.encoded, r.kept, r.rows) == (16, 56, 72)  # only the shard holding the changed image
    cache = ArtworkCache.load(tmp_path / "c")
    torch.testing.assert_close(cache.gather([ids[20]]), cache.gather([ids[60]]), atol=1e-5, rtol=1e-4)
    fresh = build_cache(world_copy, tmp_path / "fresh", vision_cfg, cache_cfg, tower=tower, progress=False)
    assert fresh.rows == 72
    other = ArtworkCache.load(tmp_path / "fresh")
    torch.testing.assert_close(cache.gather(ids), other.gather(ids), atol=1e-5, rtol=1e-4)
    assert verify_cache(tmp_path / "c", world_copy) == []


def test_load_and_verify_refuse_images_changed_since_the_build(world_copy, tmp_path, tower, vision_cfg, cache_cfg,
                                                               capsys):
    build_cache(world_copy, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    ids, path = _paths(world_copy)
    os.utime(world_copy / path[ids[5]])  # touched, same bytes: still the image that was encoded
    ArtworkCache.load(tmp_path / "c")
    _replace_image(world_copy, ids[7], ids[40])
    with pytest.raises(CacheError, match=f"1 artwork image.*changed since the build: {ids[7]} ") as e:
        ArtworkCache.load(tmp_path / "c")
    assert "\n" not in str(e.value) and "mmart cache build" in str(e.value)
    ArtworkCache.load(tmp_path / "c", check_images=False)  # an explicit opt-out still loads
    assert any(ids[7] in p and "changed" in p for p in verify_cache(tmp_path / "c", world_copy))
    assert main(["cache", "verify", str(tmp_path / "c")]) == 1  # the dataset recorded in the manifest
    assert ids[7] in capsys.readouterr().err


def test_manifest_with_swapped_ids_is_refused(tiny_world, tmp_path, tower, vision_cfg, cache_cfg):
    build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    manifest_path = tmp_path / "c" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    ids = m["artwork_ids"]
    ids[3], ids[9] = ids[9], ids[3]
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"id order differs from the shards' own ids \(row 3") as e:
        ArtworkCache.load(tmp_path / "c")
    assert "\n" not in str(e.value)
    # `cache build` rewrites the manifest from the shards: sound again, nothing re-encoded.
    r = build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    assert r.encoded == 0 and ArtworkCache.load(tmp_path / "c").artwork_ids[3] == ids[9]


def test_manifest_without_shards_is_one_line(tiny_world, tmp_path, tower, vision_cfg, cache_cfg, capsys):
    build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    manifest_path = tmp_path / "c" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    del m["shards"]
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="'shards'"):
        ArtworkCache.load(tmp_path / "c")
    for cmd in (["cache", "info", str(tmp_path / "c")], ["cache", "verify", str(tmp_path / "c")]):
        assert main(cmd) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "manifest.json" in err and "'shards'" in err and "mmart cache build" in err


def test_fifo_named_png_is_a_bad_image_not_a_hang(world_copy, tmp_path, tower, vision_cfg, cache_cfg, no_hang):
    ids, path = _paths(world_copy)
    (world_copy / path[ids[30]]).unlink()
    os.mkfifo(world_copy / path[ids[30]])
    cfg = cache_cfg.__class__(**{**cache_cfg.__dict__, "skip_bad": True})
    r = build_cache(world_copy, tmp_path / "c", vision_cfg, cfg, tower=tower, progress=False)
    assert [b.artwork_id for b in r.bad] == [ids[30]] and "not a regular file" in r.bad[0].reason
    assert r.rows == 71


def test_pickled_tower_checkpoint_is_refused_with_the_fix(tiny_world, tmp_path, capsys):
    evil = tmp_path / "tower.pt"
    with open(evil, "wb") as f:  # a pickle torch's weights_only loader refuses (an arbitrary object)
        pickle.dump({"visual.proj": Fraction(1, 3)}, f)
    with pytest.raises(UserError, match="never unpickles") as e:
        from mmart.vision.tower import load_tower

        load_tower(VisionConfig(checkpoint=str(evil)))
    assert str(evil) in str(e.value) and "safetensors" in str(e.value) and "\n" not in str(e.value)
    code = main(["cache", "build", "--data", str(tiny_world), "--out", str(tmp_path / "c"), "--no-progress",
                 "--vision", str(CONFIG_ROOT / "vision" / "default.yaml"),
                 "--set", *RANDOM_TOWER, f"vision.checkpoint={evil}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and str(evil) in err and "save_file" in err
