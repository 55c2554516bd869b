"""Adaptation writes a deterministic open_clip checkpoint the tower loads; the probe is a correct classifier."""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from mmart.vision.adapt import _distinct_text_batches, adapt_tower, artwork_texts
from mmart.vision.config import AdaptConfig, VisionConfig
from mmart.vision.probe import linear_probe, tag_labels
from mmart.vision.tower import load_tower, sha256_file


def test_adapt_is_deterministic_and_loads_as_a_checkpoint(tiny_world, tmp_path):
    cfg = VisionConfig(checkpoint=None, adapt=AdaptConfig(steps=3, batch_size=16, warmup_steps=1))
    a = adapt_tower(tiny_world, cfg, tmp_path / "a.safetensors", num_workers=0, progress=False)
    adapt_tower(tiny_world, cfg, tmp_path / "b.safetensors", num_workers=0, progress=False)
    assert a["steps"] == 3 and a["artworks"] == 72 and (tmp_path / "a.safetensors.json").is_file()
    assert sha256_file(tmp_path / "a.safetensors") == sha256_file(tmp_path / "b.safetensors")
    tower = load_tower(dataclasses.replace(cfg, checkpoint=str(tmp_path / "a.safetensors")))
    assert tower.fingerprint["checkpoint_sha256"] == sha256_file(tmp_path / "a.safetensors")
    assert tower.fingerprint["init_seed"] is None
    random = load_tower(cfg)
    assert not torch.equal(tower.model.visual.proj, random.model.visual.proj)


def test_texts_and_batches_without_repeated_texts(tiny_world):
    frame = pd.read_parquet(tiny_world / "artworks.parquet")
    texts = artwork_texts(frame, "caption+tags")
    assert texts[0].startswith(frame["caption"].iloc[0]) and "theme:" in texts[0] and "tone:" in texts[0]
    uniq = sorted(set(texts))
    ids = torch.tensor([uniq.index(t) for t in texts]).numpy()
    batch = next(_distinct_text_batches(ids, 16, __import__("numpy").random.default_rng(0)))
    assert len(batch) == 16 and len({texts[i] for i in batch}) == 16


def test_linear_probe_separates_separable_data_and_reports_majority():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 16, generator=g)
    r = linear_probe(x, [f"c{i}" for i in y.tolist()], seed=0, name="toy")
    assert r.accuracy > 0.95 and (r.train, r.test, r.classes) == (210, 90, 3) and r.majority < 0.5
    noise = linear_probe(torch.randn(300, 16, generator=g), [f"c{i}" for i in y.tolist()], seed=0)
    assert noise.accuracy < 0.6


def test_tag_labels(tiny_world):
    frame = pd.read_parquet(tiny_world / "artworks.parquet")
    shots = tag_labels(frame, "shot")
    assert len(shots) == 72 and set(shots.values()) == {"close-up", "group"}


def test_adapt_if_stale_keeps_a_tower_of_this_catalog_and_refits_after_an_image_changed(world_copy, tmp_path, capsys):
    """Issue 15.4: an adapted tower records the catalog it was fitted on; `--if-stale` refits when that changes."""
    from mmart.cli import main

    out = tmp_path / "tower.safetensors"
    args = ["vision", "adapt", "--config", "configs/smoke.yaml", "--data", str(world_copy), "--out", str(out),
            "--if-stale", "--no-progress", "--num-workers", "0",
            "--set", "vision.adapt.steps=2", "vision.adapt.batch_size=16", "vision.adapt.warmup_steps=1"]
    assert main(args) == 0
    first = sha256_file(out)
    capsys.readouterr()
    assert main(args) == 0
    assert "is up to date" in capsys.readouterr().out and sha256_file(out) == first

    images = sorted((world_copy / "images").glob("*.png"))
    images[0].write_bytes(images[1].read_bytes())  # same artwork id, other pixels
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "must be adapted again" in said and "catalog" in said
    assert sha256_file(out) != first
