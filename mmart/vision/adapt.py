"""``mmart vision adapt``: teach a small tower what the catalog's artworks show, contrastively.

Run as: ``mmart vision adapt --vision configs/vision/default.yaml --data data/world``

No pretrained weights can be had offline, and a randomly initialised tower's embeddings
do not separate themes or shots well enough for the chooser to use them. A real team
adapts CLIP to its artwork style the same way: a short CLIP training on the catalog's
(artwork, text) pairs, with open_clip's own model (text tower included) and its
``ClipLoss``. The text is the artwork's caption and tags, which name what the artwork
shows (theme, shot, tone, title size). The result is an ordinary open_clip state dict
in safetensors, loaded by ``VisionConfig.checkpoint`` like any other checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmart.errors import UserError
from mmart.vision.config import VisionConfig
from mmart.vision.images import ArtworkImages, catalog_items, collate, keep_freed_memory
from mmart.vision.tower import quiet_random_init, register_models


def artwork_texts(frame: Any, mode: str) -> list[str]:
    """One text per artwork: its caption and/or its tags (``theme:romance shot:close-up ...``)."""
    texts = []
    for i in range(len(frame)):
        parts = []
        if mode in ("caption+tags", "caption") and "caption" in frame and isinstance(frame["caption"].iloc[i], str):
            parts.append(frame["caption"].iloc[i])
        if mode in ("caption+tags", "tags") and "tags" in frame and frame["tags"].iloc[i] is not None:
            parts.append(" ".join(str(t) for t in frame["tags"].iloc[i]))
        texts.append(" ".join(parts))
    if not any(texts):
        raise UserError(f"artworks.parquet has no {mode!r} text to adapt the tower on; "
                        "add a caption or tags column, or set vision.checkpoint=null to use a random tower")
    return texts


def decode_all(items: list, preprocess: Any, num_workers: int) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Decode and preprocess every artwork once (workers in parallel): pixels ``[N_good, 3, H, W]``."""
    loader = torch.utils.data.DataLoader(ArtworkImages(items, preprocess), batch_size=64, num_workers=num_workers,
                                         collate_fn=collate)
    pixels, positions, bad = [], [], []
    for batch in loader:
        if batch["pixels"] is not None:
            pixels.append(batch["pixels"])
            positions += batch["positions"]
        bad += batch["bad"]
    if not pixels:
        raise UserError("no readable artwork images to adapt on")
    return torch.cat(pixels), positions, bad


def _distinct_text_batches(text_ids: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless batches in which no text appears twice.

    ``ClipLoss`` treats every other pair in a batch as a negative; two artworks with the
    same text would be pushed apart for no reason. Sampling distinct texts first, then one
    artwork per text, also balances the rare texts against the common ones.
    """
    groups = [np.flatnonzero(text_ids == t) for t in range(text_ids.max() + 1)]
    while True:
        chosen = rng.choice(len(groups), size=min(batch_size, len(groups)), replace=False)
        if len(groups) == len(text_ids):  # every text unique (a real catalog): plain random batches
            yield np.sort(chosen)
        else:
            yield np.array([rng.choice(groups[t]) for t in chosen])


def _shift(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Random small translation per batch (cheap augmentation so the tower keys on content, not exact pixels)."""
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(pixels, shifts=(dy, dx), dims=(2, 3))


def adapt_made_from(data_dir: str | Path, vision: VisionConfig) -> dict[str, Any]:
    """What an adapted tower is fitted on: the catalog's artworks (table and image bytes) and the settings."""
    import dataclasses

    from mmart.artefacts import images_fingerprint

    settings = {k: v for k, v in dataclasses.asdict(vision).items() if k not in ("checkpoint",)}
    return {"stage": "vision adapt", "config": settings, "inputs": {"catalog": images_fingerprint(data_dir)}}


def adapted_made_from(path: str | Path) -> dict[str, Any] | None:
    """The record inside an adapted tower's safetensors (None for another file or an older one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mmart", "{}"))
    except Exception:  # not a safetensors file, or unreadable: nothing to trust
        return None
    return meta.get("made_from")


def adapt_tower(data_dir: str | Path, vision: VisionConfig, out_path: str | Path, num_workers: int = 2,
                progress: bool = True) -> dict[str, Any]:
    """Train ``vision.model`` (from its pretrained tag, else a seeded init) on the catalog; save to ``out_path``."""
    from mmart.data.contract import load_contract

    cfg = vision.adapt
    start = time.perf_counter()
    keep_freed_memory()
    register_models()
    contract = load_contract(data_dir, check=False)
    items = catalog_items(contract)
    texts_all = artwork_texts(contract.frame("artworks"), cfg.text)
    model, preprocess, tokenizer = _seeded_model(vision)

    pixels, positions, bad = decode_all(items, preprocess, num_workers)
    if bad:
        print(f"adapt: skipping {len(bad)} unreadable artwork(s), e.g. {items[bad[0][0]].artwork_id}: {bad[0][1]}")
    texts = [texts_all[p] for p in positions]
    uniq = sorted(set(texts))
    where = {t: i for i, t in enumerate(uniq)}
    text_ids = np.array([where[t] for t in texts])
    tokens = tokenizer(uniq)  # [num_distinct_texts, context_length]
    losses = _contrastive_steps(model, cfg, pixels, text_ids, tokens, progress)

    out_path = Path(out_path)
    _save_tower(model, vision, data_dir, out_path)
    report = {
        "checkpoint": str(out_path), "model": vision.model, "pretrained": vision.pretrained, "data_dir": str(data_dir),
        "artworks": len(positions), "skipped_bad": len(bad), "distinct_texts": len(uniq), "text": cfg.text,
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
        "loss_first": losses[0] if losses else None, "loss_last_50_mean": float(np.mean(losses[-50:])) if losses else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_path.with_name(out_path.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _seeded_model(vision: VisionConfig) -> tuple[Any, Any, Any]:
    """The open_clip model (seeded, so a random init repeats), its preprocessing and its tokenizer."""
    import open_clip

    torch.manual_seed(vision.adapt.seed)
    with quiet_random_init(vision.model, random_init=not vision.pretrained):
        model, _, preprocess = open_clip.create_model_and_transforms(
            vision.model, pretrained=vision.pretrained or None,
            image_mean=tuple(vision.image_mean) if vision.image_mean else None,
            image_std=tuple(vision.image_std) if vision.image_std else None,
            image_interpolation=vision.image_interpolation, image_resize_mode=vision.image_resize_mode,
            output_dict=True)
    return model, preprocess, open_clip.get_tokenizer(vision.model)


def _contrastive_steps(model: Any, cfg: Any, pixels: torch.Tensor, text_ids: np.ndarray, tokens: torch.Tensor,
                       progress: bool) -> list[float]:
    """open_clip's contrastive loss over batches of distinct texts (shifted pixels); returns each step's loss."""
    import open_clip
    from tqdm.auto import tqdm

    # The text vocabulary table (49408 rows) stays at its init: a catalog's texts use a few hundred
    # tokens, and updating every row each step costs more than the rest of the optimizer step.
    model.token_embedding.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in params if p.ndim < 2 or "embedding" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))
    loss_fn = open_clip.ClipLoss()
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    batches = _distinct_text_batches(text_ids, cfg.batch_size, rng)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="adapt", unit="step", disable=not progress)
    for _ in bar:
        idx = torch.from_numpy(next(batches))
        out = model(_shift(pixels[idx], gen), tokens[torch.from_numpy(text_ids[idx.numpy()])])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # as in open_clip's training loop: keep the temperature in [1, 100]
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _save_tower(model: Any, vision: VisionConfig, data_dir: str | Path, out_path: Path) -> None:
    """Safetensors, atomically, with what it was made from."""
    from safetensors.torch import save_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # A single metadata key: safetensors writes several in hash order, and the bytes must repeat.
    meta = {"model": vision.model, "by": "mmart vision adapt", "made_from": adapt_made_from(data_dir, vision)}
    save_file(state, str(tmp), metadata={"mmart": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, out_path)
