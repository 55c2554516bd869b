"""Padding helpers shared by collators, scoring and tests.

Shape letters: B batch, L sequence length, M artworks per prompt, D decisions per row, K candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L])`` from token lists, padded on ``side``.

    Right padding is what TRL's collators use for training; left padding is what batched
    ``generate`` needs. ``read_log_probs`` accepts either.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def pad_2d(rows: Sequence[Sequence[Any]], fill: Any, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``[B, W]`` from per-row lists, right-padded with ``fill`` (W >= 1)."""
    width = max([1, *(len(r) for r in rows)])
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out


def pad_3d(rows: Sequence[Sequence[Sequence[Any]]], fill: Any, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``[B, D, K]`` from per-row lists of per-decision lists, padded with ``fill``."""
    d = max([1, *(len(r) for r in rows)])
    k = max([1, *(len(x) for r in rows for x in r)])
    out = torch.full((len(rows), d, k), fill, dtype=dtype)
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            if len(x):
                out[i, j, : len(x)] = torch.as_tensor(list(x), dtype=dtype)
    return out


def pad_artwork_ids(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """``artwork_ids [B, M]`` from per-prompt lists of cache rows (in slot order), padded with -1."""
    return pad_2d(rows, -1)
