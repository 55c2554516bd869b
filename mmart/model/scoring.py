"""Choosing = one forward: every candidate's score from a single pass over the shared prompt.

The readout (``mmart.model.readout``) says which token is read at which position for each
candidate; here one forward gives the log-probabilities of all of them, for a batch of
rows that may pack several decisions each (``mmart.model.packing``). One forward gives all
K letters' log-probabilities, the same numbers as K forwards over prompt + letter_k
(tests/model/test_scoring.py checks it), K times cheaper.

Shape letters: B rows, L sequence length, M artworks per row, D decisions per row,
K candidates, P read positions, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from mmart.model.forward import logits_at, token_log_probs
from mmart.model.prefix import agreed_across_ranks, can_reuse_prefix, read_log_probs_two_pass


def answer_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of each row's last real token (mask 1), under left or right padding."""
    length = attention_mask.shape[-1]
    positions = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)


def read_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    artwork_ids: torch.Tensor | None,
    token_ids: torch.Tensor,
    positions: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache=None,
) -> torch.Tensor:
    """Log-probabilities ``[B, P]`` (fp32) of ``token_ids`` read at ``positions``, in one forward.

    Args:
        input_ids: ``[B, L]`` prompts, left or right padded.
        attention_mask: ``[B, L]`` (1 on real tokens), or a 4-D packed mask (with ``position_ids``).
        artwork_ids: ``[B, M]`` cache rows for the slots (-1 padding), or None for text-only prompts.
        token_ids: ``[P]`` shared by the batch, or ``[B, P]`` with -1 where a row reads less
            (its log-prob is then ``-inf``).
        positions: ``[B, P]``: token p is read at ``positions[b, p]``; None = every token at each
            row's last real token (a letter readout's answer position).
        position_ids, cache: as ``logits_at``.

    The log-softmax is over the whole vocabulary (not renormalised over the candidates), as
    TRL's DPO and SFT losses see it.
    """
    tokens = token_ids.to(input_ids.device)
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0).expand(input_ids.shape[0], -1)
    if positions is None:
        if attention_mask.ndim != 2:
            raise ValueError("packed rows need explicit read positions")
        at = answer_positions(attention_mask).unsqueeze(-1).expand_as(tokens).contiguous()
        if bool((at < 0).any()):
            raise ValueError("a row of attention_mask is all padding")
    else:
        at = positions.to(input_ids.device).long()
        if attention_mask.ndim == 2:
            lengths = attention_mask.sum(-1, keepdim=True).expand_as(at)
            if bool((at[tokens >= 0] >= lengths[tokens >= 0]).any()):
                raise ValueError("a read position lies past its row's last real token (positions index right-padded rows)")
        at = at.clamp(min=0)
    logits = logits_at(model, input_ids, attention_mask, artwork_ids, at, position_ids, cache)
    return token_log_probs(logits, tokens)


TWO_PASS_MIN_DECISIONS = 12  # title decisions in a row from which the cached-prefix pass is the faster (score_batch)


def score_batch(model: nn.Module, batch: dict[str, torch.Tensor], readout=None, two_pass: bool | None = None
                ) -> torch.Tensor:
    """Candidate scores ``[B, D, K]`` (fp32, ``-inf`` past a decision's own K) of a collated batch.

    ``batch`` comes from ``mmart.model.packing.collate_rows``; rows may pack several decisions.
    ``readout`` (optional) turns the read log-probabilities into scores (its ``candidate_scores``).

    ``two_pass``: how a packed batch is computed. One pass runs each row as one sequence under a
    block mask: exact, but its attention is dense over the whole row, so a 40-title row pays
    ``L^2`` for mostly-masked pairs. Two passes (``mmart.model.prefix``) run the member prefixes
    once with a key/value cache, then every title block as its own short row reading that cache:
    the same numbers, attention ``~blocks x (prefix + block)``, and less padding. Default
    (None): two passes whenever a row packs several blocks, unless activation checkpointing is on
    (its recomputation cannot rebuild a key/value cache with gradients).
    """
    from mmart.model.packing import attention_inputs

    if two_pass is None:
        # Counted in decisions, not blocks: a decision's own-candidate blocks (prompt.candidate_context: own)
        # are ~11 tokens each, too short for the second pass to pay.
        wanted = int(batch["decision_mask"].sum(-1).max()) >= TWO_PASS_MIN_DECISIONS and can_reuse_prefix(model)
        two_pass = agreed_across_ranks(model, wanted, batch["input_ids"].device)
    if two_pass:
        read = read_log_probs_two_pass(model, batch)
    else:
        b, d, k = batch["answer_ids"].shape
        mask = attention_inputs(model, batch)
        read = read_log_probs(model, batch["input_ids"], mask, batch.get("artwork_ids"),
                              batch["answer_ids"].reshape(b, d * k), batch["score_positions"].reshape(b, d * k),
                              batch["position_ids"]).reshape(b, d, k)
    return readout.candidate_scores(read) if readout is not None else read
