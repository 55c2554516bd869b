"""One forward of the chooser, read at chosen positions: next-token logits and their log-probabilities.

The primitive under both ways of scoring a batch: one pass over whole rows
(``mmart.model.scoring``) and two passes, a cached member prefix then its title blocks
(``mmart.model.prefix``, ``mmart.model.shared_prefix``).

Shape letters: B rows, L sequence length, M artworks per row, P read positions, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, L]`` counting real tokens only, so left padding does not shift RoPE.

    Without them a left-padded row would be scored at shifted positions and differ from
    the same prompt unpadded (transformers' plain forward uses ``arange(L)``).
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    artwork_ids: torch.Tensor | None,
    positions: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cache=None,
    extra: dict | None = None,
) -> torch.Tensor:
    """Next-token logits ``[B, P, V]`` at ``positions [B, P]`` of each row, in one forward.

    ``attention_mask`` is ``[B, L]`` (padding) or a prepared ``[B, 1, L, C + L]`` mask (packed rows;
    then ``position_ids`` are required). ``cache``: a key/value cache holding C tokens these rows
    continue (a member prefix computed once); it is extended in place. Only the needed positions go
    through the LM head
    (``logits_to_keep``): the full ``[B, L, V]`` logits would be ~0.5 GB for 16 prompts of 150
    tokens with a 49k vocabulary. ``extra``: keyword arguments for the model's attention function
    (``mmart.model.shared_prefix``).
    """
    if position_ids is None:
        if attention_mask.ndim != 2:
            raise ValueError("a 4-D attention mask needs explicit position_ids")
        position_ids = position_ids_from_mask(attention_mask)
    keep = torch.unique(positions)  # [U], sorted
    logits_to_keep: int | torch.Tensor = 1 if keep.numel() == 1 and int(keep) == input_ids.shape[1] - 1 else keep
    kwargs: dict = {"artwork_ids": artwork_ids} if artwork_ids is not None else {}
    kwargs.update(extra or {})
    if cache is not None:
        kwargs["cache"] = cache
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=logits_to_keep,
        use_cache=cache is not None,
        **kwargs,
    )
    logits = outputs.logits  # [B, U, V]
    column = torch.searchsorted(keep, positions) if logits.shape[1] > 1 else torch.zeros_like(positions)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(-1)
    return logits[rows, column]


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of ``logits [B, P, V]`` at ``tokens [B, P]``; ``-inf`` where a token is -1."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, P, V]
    picked = log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(tokens < 0, float("-inf"))
