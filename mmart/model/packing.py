"""Packed decisions: one member prefix, then several title blocks, in one sequence.

A member's history is most of every prompt. Packed, it is read once: a row holds the
prefix and then the title blocks of decisions that share it (same member, same history
before the decision: ``Decision.prefix_key``). Each block attends to the prefix and to
itself only, and its position ids continue from the prefix as if it were alone, so every
title's scores equal its scores in its own unpacked prompt (tests/model/test_packing.py).
An unpacked prompt is the same row with one block.

Shape letters: B rows, L tokens, M artworks per row, D decisions per row, K candidates.

Rows are plain dicts of lists (``datasets``-friendly); ``collate_rows`` pads them into
tensors; ``attention_inputs`` turns a batch's segment ids into the mask the model takes:
the usual 2-D padding mask when no row holds more than one block, else a 4-D mask
``[B, 1, L, L]`` that transformers passes to the attention as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmart.errors import UserError
from mmart.model.batching import pad_2d, pad_3d

PAD_SEGMENT = -1  # segment id of padding; 0 = the member prefix; j = title block j (1-based)
IGNORE = -100  # label of a token no loss is taken on (``rationale_labels``)

# Per-decision list fields of a row and their padding in ``collate_rows``.
DECISION_FIELDS = {"score_positions": 0, "answer_ids": -1}


def pack_decisions(decisions: Sequence[Any], max_titles: int, rows_of: Callable[[Sequence[str]], list[int]],
                   fields: dict[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """Rows of at most ``max_titles`` decisions sharing a member prefix (1 = one prompt per decision).

    ``decisions``: ``mmart.examples.Decision`` objects; ``rows_of`` maps artwork ids to cache rows;
    ``fields``: per-decision values (aligned with ``decisions``) copied into each row as lists
    ``[D]`` under their names (labels, teacher targets, weights). Rows keep the decisions' order
    of first appearance; ``decision_index`` records where each came from.

    Decisions with a rationale block (``Decision.rationale``, ``sft.reasoning: auxiliary``) add it after
    the row's title blocks, a block like them (it sees the prefix and itself); a title block may carry
    trained tokens of its own (``Segment.labels``: the rationale before the answer, ``sft.reasoning:
    before_answer``). Every row with either then carries ``rationale_labels`` (the token id on a rationale's own tokens, ``IGNORE`` elsewhere) and
    ``rationale_owner`` (the decision, 0-based in the row, each labelled token belongs to; -1 elsewhere).
    The title blocks keep their tokens and positions: a row's scores are those of the row without them.
    """
    if max_titles < 1:
        raise ValueError(f"max_titles must be >= 1, got {max_titles}")
    fields = fields or {}
    reasoning = any(getattr(d, "rationale", None) is not None or any(getattr(b, "labels", None) for b in d.blocks)
                    for d in decisions)
    groups: dict[Any, list[int]] = {}
    for i, d in enumerate(decisions):
        groups.setdefault(d.prefix_key, []).append(i)
    rows = []
    for members in groups.values():
        for s in range(0, len(members), max_titles):
            rows.append(_row([decisions[i] for i in members[s: s + max_titles]], members[s: s + max_titles],
                             rows_of, fields, reasoning))
    return rows


def _row(ds: Sequence[Any], index: list[int], rows_of, fields: dict[str, Sequence[Any]],
         reasoning: bool = False) -> dict[str, Any]:
    prefix = ds[0].prefix
    ids, segments = list(prefix.ids), [0] * len(prefix.ids)
    positions = list(range(len(prefix.ids)))
    arts = list(prefix.artworks)
    score_positions, answer_ids = [], []
    labels, owner = [IGNORE] * len(ids), [-1] * len(ids)
    segment = 0
    for j, d in enumerate(ds):
        if d.prefix.ids != prefix.ids or d.prefix.artworks != prefix.artworks:
            raise ValueError(f"decisions {ds[0].example.example_id} and {d.example.example_id} share a prefix key "
                             "but not their prefix tokens")
        reads = []
        for block in d.blocks:  # each block its own segment: it sees the prefix and itself
            segment += 1
            start = len(ids)
            ids.extend(block.ids)
            segments.extend([segment] * len(block.ids))
            positions.extend(range(len(prefix.ids), len(prefix.ids) + len(block.ids)))
            arts.extend(block.artworks)
            reads.extend(start + r for r in block.reads)
            _label(labels, owner, getattr(block, "labels", None) or [IGNORE] * len(block.ids), j)
        score_positions.append(reads)
        answer_ids.append(list(d.read_ids))
    if reasoning:
        for j, d in enumerate(ds):
            if d.rationale is None:
                continue
            block = d.rationale
            segment += 1
            ids.extend(block.ids)
            segments.extend([segment] * len(block.ids))
            positions.extend(range(len(prefix.ids), len(prefix.ids) + len(block.ids)))
            arts.extend(block.artworks)
            trained = len(block.ids) - d.rationale_tokens
            _label(labels, owner, [IGNORE] * trained + list(block.ids[trained:]), j)
    row = {
        "input_ids": ids, "segment_ids": segments, "position_ids": positions, "artwork_ids": rows_of(arts),
        "score_positions": score_positions, "answer_ids": answer_ids,
        "example_id": [d.example.example_id for d in ds], "decision_index": index,
    }
    if reasoning:
        row["rationale_labels"], row["rationale_owner"] = labels, owner
    for name, values in fields.items():
        row[name] = [values[i] for i in index]
    return row


def _label(labels: list[int], owner: list[int], block_labels: Sequence[int], j: int) -> None:
    """Append a block's per-token labels, and decision ``j`` as the owner of each trained one."""
    labels.extend(block_labels)
    owner.extend(-1 if t == IGNORE else j for t in block_labels)


def collate_rows(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad rows (right padding) into a batch.

    Returns ``input_ids``, ``segment_ids`` (``PAD_SEGMENT`` on padding), ``position_ids``,
    ``attention_mask`` ``[B, L]``; ``artwork_ids`` ``[B, M]`` (-1 pad); ``score_positions`` and
    ``answer_ids`` ``[B, D, K]`` (0 / -1 pad); ``decision_mask`` ``[B, D]``; and when the rows carry
    them: ``chosen`` ``[B, D]`` (-1 = no label), ``rejected_mask`` ``[B, D, K]``, ``target_probs`` and
    ``true_p`` ``[B, D, K]``, ``weight`` ``[B, D]``, ``rationale_labels`` and ``rationale_owner`` ``[B, L]``.
    """
    out = {
        "input_ids": pad_2d([r["input_ids"] for r in rows], pad_token_id, torch.long),
        "segment_ids": pad_2d([r["segment_ids"] for r in rows], PAD_SEGMENT, torch.long),
        "position_ids": pad_2d([r["position_ids"] for r in rows], 0, torch.long),
        "artwork_ids": pad_2d([r["artwork_ids"] for r in rows], -1, torch.long),
    }
    out["attention_mask"] = (out["segment_ids"] != PAD_SEGMENT).long()
    for name, fill in DECISION_FIELDS.items():
        out[name] = pad_3d([r[name] for r in rows], fill, torch.long)
    out["decision_mask"] = pad_2d([[True] * len(r["answer_ids"]) for r in rows], False, torch.bool)
    if "chosen" in rows[0]:
        out["chosen"] = pad_2d([r["chosen"] for r in rows], -1, torch.long)
    if "rejected" in rows[0]:
        d, k = out["answer_ids"].shape[1:]
        mask = torch.zeros((len(rows), d, k), dtype=torch.bool)
        for i, r in enumerate(rows):
            for j, rej in enumerate(r["rejected"]):
                if r.get("chosen") is not None and r["chosen"][j] in rej:
                    raise ValueError(f"row {i} decision {j}: the chosen candidate is also listed as rejected")
                mask[i, j, list(rej)] = True
        out["rejected_mask"] = mask
    for name in ("target_probs", "true_p"):  # per candidate: a teacher's distribution, the true P(play)
        if name in rows[0]:
            out[name] = pad_3d([r[name] for r in rows], 0.0, torch.float32)
    if "weight" in rows[0]:
        out["weight"] = pad_2d([r["weight"] for r in rows], 0.0, torch.float32)
    if "rationale_labels" in rows[0]:  # sft.reasoning: auxiliary, per token [B, L]
        out["rationale_labels"] = pad_2d([r["rationale_labels"] for r in rows], IGNORE, torch.long)
        out["rationale_owner"] = pad_2d([r["rationale_owner"] for r in rows], -1, torch.long)
    return out


def block_attention(segment_ids: torch.Tensor, prefix_length: int = 0) -> torch.Tensor:
    """``[B, 1, L, prefix_length + L]`` bool: query i may attend to key j.

    Causal, and a block token sees the prefix (segment 0, and the ``prefix_length`` tokens of a
    prefix already in the key/value cache) and its own block only. Padding queries attend to
    themselves, so no attention row is empty (an empty row is NaN in SDPA).
    """
    length = segment_ids.shape[-1]
    dev = segment_ids.device
    causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
    q, k = segment_ids.unsqueeze(-1), segment_ids.unsqueeze(-2)  # [B, L, 1], [B, 1, L]
    visible = (k == 0) | (k == q)
    allowed = causal & visible & (k != PAD_SEGMENT) & (q != PAD_SEGMENT)
    allowed |= torch.eye(length, dtype=torch.bool, device=dev)
    if prefix_length:
        cached = (q != PAD_SEGMENT).expand(-1, -1, prefix_length)  # [B, L, P]
        allowed = torch.cat([cached, allowed], dim=-1)
    return allowed.unsqueeze(1)


def attention_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix_length: int = 0) -> torch.Tensor:
    """The attention mask for ``batch``: 2-D when every row has at most one block and no prefix is cached,
    else 4-D (``block_attention``; ``prefix_length``: tokens already in the key/value cache).

    A 4-D mask is bool for SDPA (and flex / other mask-taking kernels) and additive float for
    eager attention, which adds it to the scores; FlashAttention takes no custom mask.
    """
    segments = batch["segment_ids"]
    if int(segments.max()) <= 1 and not prefix_length:
        return batch["attention_mask"]
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "module"):
        model = model.module
        config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if "flash" in impl:
        raise UserError(f"packed decisions need an attention that takes a custom mask; model.attn_implementation={impl!r} "
                        "does not: use sdpa, or set pack_titles=1 (sft, dpo, eval)")
    return in_attention_form(model, block_attention(segments, prefix_length), impl)


def in_attention_form(model: torch.nn.Module, allowed: torch.Tensor, impl: str) -> torch.Tensor:
    """A bool 4-D mask as the attention takes it: as it is for SDPA, additive float for eager."""
    if impl == "eager":
        dtype = next(p for p in model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed
