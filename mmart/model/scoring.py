"""Choosing = one forward: every candidate's score from a single pass over the shared prompt.

Two readouts (``prompt.answer``):

* ``letter``: the log-probabilities of the K letters at the answer position (the prompt's end).
* ``per_candidate``: the log-probability of one fixed token (" yes") at each candidate's own
  position, right after its artwork. Causal attention lets each position see the history and
  its own artwork; a small LLM judges each artwork where it stands instead of having to map
  the right slot back to a letter (scripts/probe_answer_format.py measures the difference).

Shape letters: B batch, L sequence length, M artworks per prompt, K candidates, V vocabulary.

The prompt ends where the answer starts (after the chat template's generation prompt),
so the next-token distribution at its last real token is the model's choice over the
letters. One forward gives all K letters' log-probabilities, the same numbers as K
forwards over prompt + letter_k (tests/model/test_scoring.py checks it), K times cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def letter_token_ids(tokenizer, k: int | Sequence[str]) -> torch.Tensor:
    """Token ids ``[K]`` of the letters ``A, B, ...`` (or the given strings) as the answer's first token.

    Raises if a letter is not exactly one token: scoring reads one position only.
    """
    letters = list(LETTERS[:k]) if isinstance(k, int) else list(k)
    if isinstance(k, int) and not 0 < k <= len(LETTERS):
        raise ValueError(f"between 1 and {len(LETTERS)} candidates are supported, got {k}")
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the answer {letter!r} tokenizes to {len(encoded)} tokens ({encoded}); it must be one")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {letters} do not map to distinct tokens: {ids}")
    return torch.tensor(ids, dtype=torch.long)


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of each row's last real token (mask 1), under left or right padding."""
    length = attention_mask.shape[-1]
    positions = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)


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
) -> torch.Tensor:
    """Next-token logits ``[B, P, V]`` at ``positions [B, P]`` of each row, in one forward.

    Only the needed positions go through the LM head (``logits_to_keep``): the full
    ``[B, L, V]`` logits would be ~0.5 GB for 16 prompts of 150 tokens with a 49k vocabulary.
    """
    keep = torch.unique(positions)  # [U], sorted
    logits_to_keep: int | torch.Tensor = 1 if keep.numel() == 1 and int(keep) == input_ids.shape[1] - 1 else keep
    kwargs = {"artwork_ids": artwork_ids} if artwork_ids is not None else {}
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=logits_to_keep,
        use_cache=False,
        **kwargs,
    )
    logits = outputs.logits  # [B, U, V]
    column = torch.searchsorted(keep, positions) if logits.shape[1] > 1 else torch.zeros_like(positions)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(-1)
    return logits[rows, column]


def score_letters(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    artwork_ids: torch.Tensor | None,
    letter_token_ids: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probabilities ``[B, K]`` (fp32) of the candidate letters as the answer's next token.

    Args:
        input_ids: ``[B, L]`` prompts ending at the answer position, left or right padded.
        attention_mask: ``[B, L]``, 1 on real tokens.
        artwork_ids: ``[B, M]`` cache rows for the slots (-1 padding), or None for text-only prompts.
        letter_token_ids: ``[K]`` shared by the batch, or ``[B, K]`` with -1 where a row has
            fewer candidates (its log-prob is then ``-inf``).
        positions: ``[B, K]`` per-candidate readout: candidate k's token is read at
            ``positions[b, k]`` (right-padded rows) instead of at the answer position.

    The log-softmax is over the whole vocabulary (not renormalised over the letters), as
    TRL's DPO and SFT losses see it; ``softmax`` over the K columns gives the choice.
    """
    tokens = letter_token_ids.to(input_ids.device)
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0).expand(input_ids.shape[0], -1)
    if positions is None:  # letters: every candidate read at the row's last real token
        at = answer_positions(attention_mask).unsqueeze(-1)  # [B, 1]
        if bool((at < 0).any()):
            raise ValueError("a row of attention_mask is all padding")
    else:
        at = positions.to(input_ids.device).long()
        lengths = attention_mask.sum(-1, keepdim=True).expand_as(at)
        if bool((at[tokens >= 0] >= lengths[tokens >= 0]).any()):
            raise ValueError("a score position lies past its row's last real token (positions index right-padded rows)")
        at = at.clamp(min=0)
    log_probs = torch.log_softmax(logits_at(model, input_ids, attention_mask, artwork_ids, at).float(), dim=-1)
    if positions is None:
        picked = log_probs[:, 0].gather(-1, tokens.clamp(min=0))  # [B, K] from one row of logits
    else:
        picked = log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # one row per candidate
    return picked.masked_fill(tokens < 0, float("-inf"))
