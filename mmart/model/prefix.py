"""Packed rows in two passes: each member prefix once into a key/value cache, then every title block.

A packed row (``mmart.model.packing``) is exact in one pass under a block mask, but that pass
is dense: a row of one 230-token prefix and 40 blocks of 41 tokens is a 1,900-token sequence
whose attention costs ``1900^2`` per head and layer, although each block only needs
``41 x 271`` of it. Here the same batch runs as

1. the rows' prefixes, ``[B, P]`` (right padded), with a fresh ``DynamicCache``;
2. the cache's rows repeated for each block (``batch_select_indices``: plain indexing, so the
   gradient flows back into the prefix pass), and every block as its own row ``[N, T]``, with
   position ids continuing from its own prefix and a 4-D mask that lets it see its prefix
   (not the prefix's padding) and itself causally.

The scores are those of the one-pass row and of each decision's own prompt
(``tests/model/test_packing.py``), and the loss and its gradients are the same
(``tests/train/test_packed_training.py``). Both passes run through the model's own forward,
so PEFT, the artwork pre-hook and TRL's wrapping see ordinary calls.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from mmart.model.batching import pad_artwork_ids
from mmart.model.forward import logits_at, token_log_probs
from mmart.model.packing import PAD_SEGMENT, in_attention_form


def can_reuse_prefix(model: nn.Module) -> bool:
    """Whether the two passes may train this model: not under activation checkpointing (its recomputation
    drops the cache's graph), and not under FSDP or DeepSpeed, whose per-module gather and reshard hooks
    are proven here for one forward per step only (tests/train/test_distributed.py); one process and DDP
    are (tests/train/test_packed_training.py)."""
    if not model.training:
        return True
    if type(model).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    for m in model.modules():
        if (FSDPModule and isinstance(m, FSDPModule)) or getattr(m, "gradient_checkpointing", False) is True:
            return False
    return True


def agreed_across_ranks(model: nn.Module, wanted: bool, device: torch.device) -> bool:
    """``wanted`` on every rank, or False for all: under DDP each forward call syncs buffers across ranks,
    so one rank taking two passes while another takes one would hang the step."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel) or not torch.distributed.is_initialized():
        return wanted
    flag = torch.tensor([int(wanted)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _slot_layout(model: nn.Module, artwork_ids: torch.Tensor | None) -> tuple[int, int] | None:
    """(slot token id, slots per artwork), or None when the batch names no artwork (text-only prompts)."""
    if artwork_ids is None or not bool((artwork_ids >= 0).any()):
        return None
    from mmart.model.chooser import artwork_state, slots_per_artwork

    return artwork_state(model).slot_token_id, slots_per_artwork(model)


def read_log_probs_two_pass(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Read log-probabilities ``[B, D, K]`` of a collated packed batch (``-inf`` where ``answer_ids`` is -1)."""
    from mmart.model.chooser import causal_lm_of

    input_ids, segments = batch["input_ids"], batch["segment_ids"]
    answer_ids, score_positions = batch["answer_ids"], batch["score_positions"]
    b, d, k = answer_ids.shape
    dev = input_ids.device
    arts = batch.get("artwork_ids")
    layout = _slot_layout(model, arts)

    # Where each row's prefix and blocks lie (segments are contiguous: 0, then 1, 2, ..., then padding);
    # a decision has one block, or one per candidate (``prompt.candidate_context: own``).
    seg_rows, id_rows = segments.tolist(), input_ids.tolist()
    art_rows = [[a for a in row if a >= 0] for row in arts.tolist()] if layout is not None else None
    pos_rows, tok_rows = score_positions.tolist(), answer_ids.tolist()
    prefix_ids, prefix_arts, block_ids, block_arts, owner, block_reads = [], [], [], [], [], []
    for r, row in enumerate(seg_rows):
        ends: dict[int, list[int]] = {}
        for i, s in enumerate(row):
            if s != PAD_SEGMENT:
                ends.setdefault(s, [i, i])[1] = i
        used = 0

        def take(lo: int, hi: int) -> list[int]:
            nonlocal used
            if layout is None:
                return []
            n = sum(1 for t in id_rows[r][lo: hi + 1] if t == layout[0]) // layout[1]
            used += n
            return art_rows[r][used - n: used]

        lo, hi = ends[0]
        prefix_ids.append(id_rows[r][lo: hi + 1])
        prefix_arts.append(take(lo, hi))
        first = len(block_ids)
        for s in range(1, max(ends) + 1):
            lo, hi = ends[s]
            block_ids.append(id_rows[r][lo: hi + 1])
            block_arts.append(take(lo, hi))
            owner.append(r)
            block_reads.append([])
        for j in range(d):  # each read goes to the block holding its position: (decision, candidate, where, token)
            for c in range(k):
                if tok_rows[r][j][c] >= 0:
                    pos = pos_rows[r][j][c]
                    block = first + row[pos] - 1
                    block_reads[block].append((j, c, pos - ends[row[pos]][0], tok_rows[r][j][c]))

    # Pass 1: the prefixes, into a cache.
    p_len = torch.tensor([len(x) for x in prefix_ids], device=dev)
    p_max = int(p_len.max())
    fill = id_rows[0][0]  # any non-slot token; padding is masked out
    ids_p = torch.tensor([x + [fill] * (p_max - len(x)) for x in prefix_ids], device=dev)
    mask_p = (torch.arange(p_max, device=dev) < p_len.unsqueeze(-1)).long()
    cache = DynamicCache(config=causal_lm_of(model).config)
    logits_at(model, ids_p, mask_p, _pad_arts(prefix_arts, layout, dev), torch.zeros((b, 1), dtype=torch.long, device=dev),
              torch.arange(p_max, device=dev).expand(b, -1), cache=cache)

    # Pass 2: every block as its own row, reading its prefix's cache rows.
    owner_t = torch.tensor(owner, device=dev)
    cache.batch_select_indices(owner_t)
    width = max(1, max(len(x) for x in block_reads))
    at = torch.tensor([[w for _, _, w, _ in x] + [0] * (width - len(x)) for x in block_reads], device=dev)
    tokens = torch.tensor([[t for *_, t in x] + [-1] * (width - len(x)) for x in block_reads], device=dev)
    picked = read_blocks(model, cache, p_len[owner_t], block_ids, _pad_arts(block_arts, layout, dev), at, tokens, fill)
    where = [(owner[n], j, c, n, i) for n, x in enumerate(block_reads) for i, (j, c, _, _) in enumerate(x)]
    rows, decs, cands, blocks, slots = (torch.tensor(v, device=dev) for v in zip(*where))
    out = torch.full((b, d, k), float("-inf"), device=dev, dtype=picked.dtype)
    return out.index_put((rows, decs, cands), picked[blocks, slots])


def read_blocks(model: nn.Module, cache, prefix_lengths: torch.Tensor, block_ids: list[list[int]],
                artwork_ids: torch.Tensor | None, read_at: torch.Tensor, tokens: torch.Tensor, fill: int = 0
                ) -> torch.Tensor:
    """Log-probabilities ``[N, K]`` (fp32; ``-inf`` where ``tokens`` is -1) of N title blocks, one row each.

    ``cache`` holds row n's prefix in its row n (right padded to a common length; extended in place);
    ``prefix_lengths [N]`` its real length; ``read_at [N, K]`` block-relative read positions;
    ``artwork_ids [N, M]`` the blocks' cache rows (-1 pad) or None; ``fill``: a padding token id that
    is not a slot.
    """
    from mmart.model.chooser import causal_lm_of

    dev = prefix_lengths.device
    p_max = int(cache.get_seq_length())
    t_len = torch.tensor([len(x) for x in block_ids], device=dev)
    t_max = int(t_len.max())
    ids_t = torch.tensor([x + [fill] * (t_max - len(x)) for x in block_ids], device=dev)
    steps = torch.arange(t_max, device=dev)
    real = steps < t_len.unsqueeze(-1)  # [N, T]
    own = torch.ones(t_max, t_max, dtype=torch.bool, device=dev).tril() & real.unsqueeze(1) & real.unsqueeze(2)
    own |= torch.eye(t_max, dtype=torch.bool, device=dev)  # padding queries see themselves: no empty softmax row
    seen = (torch.arange(p_max, device=dev) < prefix_lengths.unsqueeze(-1)).unsqueeze(1) & real.unsqueeze(2)  # [N, T, P]
    impl = getattr(causal_lm_of(model).config, "_attn_implementation", None) or "sdpa"
    mask = in_attention_form(model, torch.cat([seen, own], dim=-1).unsqueeze(1), impl)
    positions = prefix_lengths.unsqueeze(-1) + steps
    logits = logits_at(model, ids_t, mask, artwork_ids, read_at.clamp(min=0), positions, cache=cache)
    return token_log_probs(logits, tokens)


def repeated_cache(cache, times: int, config) -> DynamicCache:
    """A new cache holding ``times`` copies of a one-row ``cache`` (which stays as it is, for reuse)."""
    return DynamicCache(ddp_cache_data=[(layer.keys.expand(times, -1, -1, -1), layer.values.expand(times, -1, -1, -1))
                                        for layer in cache.layers], config=config)


def _pad_arts(lists: list[list[int]], layout, dev: torch.device) -> torch.Tensor | None:
    return None if layout is None else pad_artwork_ids(lists).to(dev)
