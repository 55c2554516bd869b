"""Padding helpers shared by scoring, collators and tests.

Shape letters: B batch, L sequence length, M artworks per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L])`` from token lists, padded on ``side``.

    Right padding is what TRL's collators use for training; left padding is what batched
    ``generate`` needs. ``score_letters`` accepts either.
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


def pad_artwork_ids(rows: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """``artwork_ids [B, M]`` from per-prompt lists of cache rows (in slot order), padded with -1."""
    width = max([1, width or 0, *(len(r) for r in rows)])
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def pad_candidates(rows: Sequence[Sequence[float]], fill: float, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``[B, K]`` from per-prompt candidate lists (answer tokens, score positions, targets), padded with ``fill``."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=dtype)


def candidate_batch(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """``answer_ids [B, K]`` (-1 pad) and, for per-candidate rows, ``score_positions [B, K]`` (0 pad)."""
    out = {"answer_ids": pad_candidates([e["answer_ids"] for e in examples], -1)}
    positions = [e.get("score_positions") or [] for e in examples]
    if any(positions):
        if not all(positions):
            raise ValueError("a batch mixes letter and per-candidate rows")
        out["score_positions"] = pad_candidates(positions, 0)
    return out
