"""Bad images: every one listed at once; --skip-bad records them and later use fails with the reason."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import pandas as pd
import pytest
from PIL import Image

from mmart.vision.cache import BadImagesError, build_cache
from mmart.vision.store import ArtworkCache, CacheError


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 20000 x 20000 pixels: Pillow's bomb guard fires on open."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    return bytes(data)


@pytest.fixture
def broken_world(world_copy):
    frame = pd.read_parquet(world_copy / "artworks.parquet")
    path = dict(zip(frame["artwork_id"], frame["path"]))
    ids = list(frame["artwork_id"])
    (world_copy / path[ids[3]]).unlink()  # missing
    whole = (world_copy / path[ids[20]]).read_bytes()
    (world_copy / path[ids[20]]).write_bytes(whole[: len(whole) // 2])  # truncated
    (world_copy / path[ids[41]]).write_text("this is not a PNG")  # not an image
    (world_copy / path[ids[50]]).write_bytes(_bomb_png())  # decompression bomb
    frame.loc[frame["artwork_id"] == ids[66], "path"] = "../../etc/passwd"  # escapes the dataset folder
    frame.to_parquet(world_copy / "artworks.parquet")
    reasons = {ids[3]: "file is missing", ids[20]: "truncated", ids[41]: "not an image",
               ids[50]: "decompression-bomb", ids[66]: "escapes the dataset folder"}
    return world_copy, reasons


def test_every_bad_image_is_listed_at_once(broken_world, tmp_path, tower, vision_cfg, cache_cfg):
    world, reasons = broken_world
    cfg = dataclasses.replace(cache_cfg, num_workers=2)  # decoding in DataLoader workers
    with pytest.raises(BadImagesError) as err:
        build_cache(world, tmp_path / "c", vision_cfg, cfg, tower=tower, progress=False)
    assert sorted(b.artwork_id for b in err.value.bad) == sorted(reasons)
    message = str(err.value)
    for aid, reason in reasons.items():
        line = next(l for l in message.splitlines() if aid in l)
        assert reason in line, line
    assert "images/" in message and "--skip-bad" in message
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert len(list((tmp_path / "c").glob("shard-*"))) == 0  # the first bad image (row 3) is in shard 0


def test_skip_bad_records_them_and_later_use_fails_clearly(broken_world, tmp_path, tower, vision_cfg, cache_cfg):
    world, reasons = broken_world
    cfg = dataclasses.replace(cache_cfg, skip_bad=True)
    r = build_cache(world, tmp_path / "c", vision_cfg, cfg, tower=tower, progress=False)
    assert r.rows == 72 - 5 and len(r.bad) == 5
    cache = ArtworkCache.load(tmp_path / "c")
    assert set(cache.bad) == set(reasons)
    good = next(a for a in cache.artwork_ids)
    assert cache.rows([good]).tolist() == [0]
    bad_id = next(a for a, why in reasons.items() if why == "truncated")
    with pytest.raises(CacheError, match=f"{bad_id}: skipped at build time as a bad image .*truncated"):
        cache.rows([good, bad_id])
    # A rerun retries only the bad ones (still bad: still recorded, nothing re-encoded).
    again = build_cache(world, tmp_path / "c", vision_cfg, cfg, tower=tower, progress=False)
    assert (again.encoded, again.kept, len(again.bad)) == (0, 67, 5)
