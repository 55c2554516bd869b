"""``mmart cache build|info|verify|probe`` end to end, and a 2-process build through accelerate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmart.cli import main
from mmart.config import CONFIG_ROOT
from mmart.vision.store import ArtworkCache

RANDOM_TOWER = ["vision.checkpoint=null", "cache.shard_size=16", "cache.num_workers=0", "cache.cpu_threads=1"]


def test_build_info_verify_probe(tiny_world, tmp_path, capsys):
    out = str(tmp_path / "c")
    assert main(["cache", "build", "--data", str(tiny_world), "--out", out, "--no-progress",
                 "--vision", str(CONFIG_ROOT / "vision" / "default.yaml"), "--set", *RANDOM_TOWER]) == 0
    assert "72 artworks; encoded 72 now" in capsys.readouterr().out
    assert main(["cache", "info", out]) == 0
    info = capsys.readouterr().out
    assert "mmart-tiny-vit" in info and "shape=[72, 1, 128]" in info and "shards     5" in info
    assert main(["cache", "verify", out, "--check-tower", "--set", *RANDOM_TOWER]) == 0
    assert main(["cache", "probe", out, "--data", str(tiny_world)]) == 0
    table = capsys.readouterr().out
    assert "theme" in table and "shot" in table and "0.90" in table
    # Verifying against another tower is refused, naming the difference.
    assert main(["cache", "verify", out, "--check-tower", "--set", *RANDOM_TOWER, "vision.init_seed=3"]) == 1
    assert "random-init seed: cache has 0, config asks for 3" in capsys.readouterr().err
    # A corrupted shard fails verify with exit code 1.
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    assert main(["cache", "verify", out]) == 1
    assert "shard-00001.safetensors: sha256 differs" in capsys.readouterr().err


def test_missing_checkpoint_is_a_user_error(tiny_world, tmp_path, capsys):
    code = main(["cache", "build", "--data", str(tiny_world), "--out", str(tmp_path / "c"),
                 "--set", f"vision.checkpoint={tmp_path}/mmart-tiny-vit-adapted.safetensors"])
    assert code == 1 and "mmart vision adapt" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not on PATH")
def test_two_process_build_through_accelerate(tiny_world, tmp_path):
    """Each process encodes its share of the shards; the main process writes one manifest."""
    out = tmp_path / "mp"
    cmd = ["accelerate", "launch", "--config_file", str(CONFIG_ROOT / "accelerate" / "cpu_2proc.yaml"),
           "-m", "mmart.cli", "cache", "build", "--data", str(tiny_world), "--out", str(out), "--no-progress",
           "--set", *RANDOM_TOWER]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("encoded 72 now") == 1  # printed by the main process only
    assert main(["cache", "verify", str(out)]) == 0
    assert main(["cache", "build", "--data", str(tiny_world), "--out", str(tmp_path / "one"), "--no-progress",
                 "--set", *RANDOM_TOWER]) == 0
    two, one = ArtworkCache.load(out), ArtworkCache.load(tmp_path / "one")
    assert two.artwork_ids == one.artwork_ids
    torch.testing.assert_close(two.embeddings, one.embeddings, atol=1e-5, rtol=1e-4)
