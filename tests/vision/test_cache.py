"""The cache: same bytes after a killed build, incremental, refuses another tower, catches corruption."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

from mmart.vision.cache import build_cache
from mmart.vision.config import VisionConfig
from mmart.vision.store import ArtworkCache, CacheError, verify_cache
from mmart.vision.tower import encode_images


class Killed(Exception):
    pass


def _shards(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.safetensors"))}


def test_build_load_and_rows_match_a_plain_encode(tiny_world, tmp_path, tower, vision_cfg, cache_cfg):
    r = build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    assert (r.rows, r.encoded, r.kept, r.shards_written) == (72, 72, 0, 5)
    cache = ArtworkCache.load(tmp_path / "c", "cpu", expect=vision_cfg, tokens_per_artwork=1)
    assert cache.embeddings.shape == (72, 1, 128) and cache.embeddings.device.type == "cpu"
    frame = pd.read_parquet(tiny_world / "artworks.parquet")
    assert cache.artwork_ids == list(frame["artwork_id"])  # row order = catalog order on a fresh build
    aid, rel = frame["artwork_id"].iloc[37], frame["path"].iloc[37]
    with torch.inference_mode():  # the plain way: PIL, open_clip's preprocess, one image
        plain = encode_images(tower.model, tower.preprocess(Image.open(tiny_world / rel).convert("RGB"))[None])
    torch.testing.assert_close(cache.gather([aid])[0], plain[0], atol=1e-5, rtol=1e-4)
    rows = cache.rows([[aid, frame["artwork_id"].iloc[0]]])
    assert rows.dtype == torch.long and rows.tolist() == [[37, 0]]
    with pytest.raises(CacheError, match=r"not in the cache, e.g. \['nope'\]"):
        cache.rows(["nope"])
    assert verify_cache(tmp_path / "c") == []


def test_killed_build_resumes_to_identical_bytes(tiny_world, tmp_path, tower, vision_cfg, cache_cfg):
    build_cache(tiny_world, tmp_path / "full", vision_cfg, cache_cfg, tower=tower, progress=False)

    def kill_after_two(index: int) -> None:
        if index == 1:
            raise Killed
    with pytest.raises(Killed):
        build_cache(tiny_world, tmp_path / "part", vision_cfg, cache_cfg, tower=tower, progress=False,
                    on_shard_written=kill_after_two)
    part = tmp_path / "part"
    assert not (part / "manifest.json").exists() and len(_shards(part)) == 2
    # What a kill mid-write leaves (the writer's pid, here one past the largest pid Linux allows: surely gone).
    (part / f"shard-00002.safetensors.tmp-{(1 << 22) + 1}").write_bytes(b"half a shard")
    r = build_cache(tiny_world, part, vision_cfg, cache_cfg, tower=tower, progress=False)
    assert (r.encoded, r.kept) == (72 - 32, 32)
    assert not list(part.glob("*.tmp-*"))
    assert _shards(part) == _shards(tmp_path / "full")
    a, b = ArtworkCache.load(part), ArtworkCache.load(tmp_path / "full")
    assert a.artwork_ids == b.artwork_ids
    assert a.embeddings.numpy().tobytes() == b.embeddings.numpy().tobytes()
    again = build_cache(tiny_world, part, vision_cfg, cache_cfg, tower=tower, progress=False)
    assert (again.encoded, again.kept) == (0, 72)  # nothing left to do


def test_incremental_build_encodes_only_new_artworks(world_copy, tmp_path, tower, vision_cfg, cache_cfg):
    build_cache(world_copy, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    before = ArtworkCache.load(tmp_path / "c")
    frame = pd.read_parquet(world_copy / "artworks.parquet")
    new = frame.iloc[:3].copy()
    new["artwork_id"] = [f"new_{i}" for i in range(3)]
    new["path"] = [f"images/new_{i}.png" for i in range(3)]
    for src, dst in zip(frame["path"].iloc[10:13], new["path"]):  # different pixels than rows 0-2
        shutil.copy(world_copy / src, world_copy / dst)
    pd.concat([frame, new], ignore_index=True).to_parquet(world_copy / "artworks.parquet")
    r = build_cache(world_copy, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    assert (r.encoded, r.kept, r.shards_written, r.rows) == (3, 72, 1, 75)
    after = ArtworkCache.load(tmp_path / "c")
    assert torch.equal(after.embeddings[:72], before.embeddings)
    torch.testing.assert_close(after.gather(["new_1"]), before.gather([frame["artwork_id"].iloc[11]]),
                               atol=1e-5, rtol=1e-4)


def test_other_tower_or_preprocessing_is_refused(tiny_world, tmp_path, tower, vision_cfg, cache_cfg):
    build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    with pytest.raises(CacheError, match="random-init seed: cache has 0, config asks for 1"):
        ArtworkCache.load(tmp_path / "c", expect=dataclasses.replace(vision_cfg, init_seed=1))
    with pytest.raises(CacheError, match="preprocessing interpolation: cache has 'bicubic', config asks for 'bilinear'"):
        ArtworkCache.load(tmp_path / "c", expect=dataclasses.replace(vision_cfg, image_interpolation="bilinear"))
    with pytest.raises(CacheError, match="architecture: cache has 'mmart-tiny-vit', config asks for 'ViT-L-14'"):
        ArtworkCache.load(tmp_path / "c", expect=VisionConfig(model="ViT-L-14", pretrained="laion2b_s32b_b82k",
                                                                checkpoint=None))
    with pytest.raises(CacheError, match="holds 1 token"):
        ArtworkCache.load(tmp_path / "c", tokens_per_artwork=4)
    # Building into it with other settings is refused too, unless --overwrite.
    grid = dataclasses.replace(cache_cfg, tokens_per_artwork=4)
    with pytest.raises(CacheError, match="tokens_per_artwork: cache has 1, config asks for 4"):
        build_cache(tiny_world, tmp_path / "c", vision_cfg, grid, tower=tower, progress=False)
    build_cache(tiny_world, tmp_path / "c", vision_cfg, grid, tower=tower, progress=False, overwrite=True)
    assert ArtworkCache.load(tmp_path / "c", tokens_per_artwork=4).embeddings.shape == (72, 4, 128)


def test_checksum_corruption_is_detected_and_repaired(tiny_world, tmp_path, tower, vision_cfg, cache_cfg):
    build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    shard = tmp_path / "c" / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the tensor bytes
    shard.write_bytes(bytes(data))
    assert any("shard-00003" in p and "sha256" in p for p in verify_cache(tmp_path / "c"))
    with pytest.raises(CacheError, match="shard-00003.safetensors: sha256 differs"):
        ArtworkCache.load(tmp_path / "c")
    r = build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    assert r.encoded == 16 and verify_cache(tmp_path / "c") == []  # only the corrupt shard re-encoded
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 16, 16, 8]


def test_a_live_concurrent_builds_temp_file_is_left_alone(tiny_world, tmp_path, tower, vision_cfg, cache_cfg):
    """Only a dead writer's temp file is cleaned: deleting a live one would make that build's rename fail."""
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
        tmp = tmp_path / "c" / f"shard-00009.safetensors.tmp-{live.pid}"
        tmp.write_bytes(b"being written")
        again = build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
        assert again.encoded == 0 and tmp.read_bytes() == b"being written"
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("edit", ["shape", "shard_rows", "dtype"])
def test_load_refuses_a_manifest_that_verify_refuses(tiny_world, tmp_path, tower, vision_cfg, cache_cfg, edit):
    """A manifest whose row count, a shard's listed rows or dtype disagree with the shards' headers: both refuse."""
    build_cache(tiny_world, tmp_path / "c", vision_cfg, cache_cfg, tower=tower, progress=False)
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "shape":
        manifest["shape"][0] += 1  # one row more than the shards hold
    elif edit == "shard_rows":
        manifest["shards"][2]["rows"] += 1
    else:
        manifest["dtype"] = "float16"
    path.write_text(json.dumps(manifest))
    problems = verify_cache(tmp_path / "c")
    assert len(problems) >= 1
    with pytest.raises(CacheError, match={"shape": "72 rows in shards, the manifest says 73",
                                          "shard_rows": "shard-00002.safetensors: 16 rows, the manifest lists 17",
                                          "dtype": r"float32 differ from the manifest's \[N, 1, 128\] / float16"}[edit]):
        ArtworkCache.load(tmp_path / "c")
