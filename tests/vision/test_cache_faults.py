"""Real faults around ``mmart cache build`` processes: a SIGKILL mid-build, and two builds into one folder at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmart.vision.store import ArtworkCache

# 72 tiny-world artworks in 18 shards of 4: a kill has many shard boundaries (and temp files) to land between.
SETTINGS = ["vision.checkpoint=null", "cache.shard_size=4", "cache.batch_size=4", "cache.num_workers=0",
            "cache.cpu_threads=1"]


def _build(data: Path, out: Path, **kw) -> subprocess.Popen:
    """`mmart cache build` in a process of its own (this checkout's code, one torch thread)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmart.cli", "cache", "build", "--data", str(data), "--out",
                             str(out), "--no-progress", "--set", *SETTINGS], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _files(d: Path) -> dict[str, bytes]:
    """Every file of a cache folder (shards and manifest), by name."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("whole") / "cache"
    rc, stdout, err = _finish(_build(tiny_world, out))
    assert rc == 0, err[-3000:]
    assert "encoded 72 now" in stdout
    files = _files(out)
    assert len([n for n in files if n.startswith("shard-")]) == 18 and "manifest.json" in files
    return files


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [r"\.tmp-\d+$", r"\.safetensors$"], ids=["first-temp-file", "first-complete-shard"])
def test_sigkilled_build_reruns_to_the_same_bytes(tiny_world, tmp_path, uninterrupted, kill_at):
    """SIGKILL as soon as the first shard's temp file (a half-written shard of a dead writer, unless the rename beat
    the kill) or the first complete shard appears; the rerun cleans the one, keeps the other, and ends with the bytes
    of a build never killed."""
    out = tmp_path / "cache"
    proc = _build(tiny_world, out)
    try:
        while proc.poll() is None:  # poll without sleeping: the kill lands within the first shard or two
            if out.is_dir() and any(re.search(kill_at, n) for n in os.listdir(out)):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    left = sorted(os.listdir(out))
    assert "manifest.json" not in left, left  # killed part-way, before the build finished
    done = [n for n in left if n.endswith(".safetensors")]
    assert len(done) < 18 and ("tmp" in kill_at or done), left

    rc, stdout, err = _finish(_build(tiny_world, out))
    assert rc == 0, err[-3000:]
    assert f"encoded {72 - 4 * len(done)} now" in stdout and f"kept {4 * len(done)} from earlier runs" in stdout
    assert _files(out) == uninterrupted  # no temp file left, same shards, same manifest
    assert ArtworkCache.load(out).embeddings.shape[0] == 72  # and it loads


@pytest.mark.slow
def test_two_builds_into_one_folder_at_once_agree_with_one_build(tiny_world, tmp_path, uninterrupted):
    """Both encode (neither sees the other's finished shards when it plans) and write the same bytes, each through
    its own temp file and an atomic rename: the folder ends as one build leaves it."""
    out = tmp_path / "cache"
    first, second = _build(tiny_world, out), _build(tiny_world, out)
    (rc1, out1, err1), (rc2, out2, err2) = _finish(first), _finish(second)
    assert (rc1, rc2) == (0, 0), (err1[-2000:], err2[-2000:])
    assert "72 artworks" in out1 and "72 artworks" in out2
    assert _files(out) == uninterrupted
    assert ArtworkCache.load(out).embeddings.shape[0] == 72  # and it loads
