"""A loaded chooser's weights made ready for scoring only, with the scores it gave before.

Scoring (``mmart predict``, the home-page API) never trains, so two per-forward costs can be paid once:

- **bf16 autocast**: autocast casts every fp32 ``nn.Linear`` weight to bf16 on each forward (frozen
  weights are not in its cast cache), a cost paid again on every forward.
  Stored in bf16 once, the matrix products get the very same bf16 operands, so the scores are
  unchanged bit for bit. LoRA stays unmerged here: its small update, folded into a weight that is
  then rounded to bf16, would partly round away and change some choices.
- **fp32**: the LoRA update is folded into the weights (PEFT's ``merge_adapter``); in fp32 that only
  reorders sums (scores equal up to fp32 rounding), and every layer loses its two extra adapter products.

Both are for a model that is scored, never trained or saved, afterwards. And on a CPU, scoring reads
grouped key/value heads in place (``grouped_kv_attention``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' switch (integrations/sdpa_attention.py)


def ready_for_scoring(model: nn.Module, bf16: bool) -> str:
    """Prepare ``model`` (in place) for scoring under bf16 autocast (``bf16``) or in fp32; says what it did."""
    model.eval()
    if bf16:
        n = _store_linears_in(model, torch.bfloat16)
        return f"{n} linear weights stored in bf16 (what autocast computes with)"
    fp32 = all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
    if fp32 and hasattr(model, "merge_adapter") and getattr(model, "peft_config", None):
        model.merge_adapter()  # (not into bf16 weights, e.g. model.dtype bf16: the update would round away)
        return "LoRA merged into the weights"
    return "as loaded"


def _store_linears_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Every ``nn.Linear`` weight and bias in ``dtype``; a weight tied to an embedding gets its own copy.

    Autocast runs ``nn.Linear`` in bf16 whatever the weight's dtype, so only the storage changes. LoRA's
    layers too: PEFT casts their input to their weights' dtype, so fp32 LoRA weights cost an fp32 copy
    of every adapted layer's input (which autocast then casts back to bf16, the same values). The
    embedding that shares the LM head's weight (SmolLM2 ties them) keeps its fp32 rows: its lookups are
    not autocast, and rounding them would change the scores.
    """
    n = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.dtype == dtype:
            continue
        # A new Parameter: a weight tied to an embedding is untied, the embedding keeps its fp32 one.
        module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        n += 1
    return n


@contextmanager
def grouped_kv_attention(device: torch.device | str) -> Iterator[None]:
    """On a CPU, SDPA reads each key/value head once for its group of query heads (torch's ``enable_gqa``).

    Without it, transformers copies every key/value head once per query head (``repeat_kv``) whenever
    there is a mask: it keeps ``enable_gqa`` for maskless CUDA calls, where a mask would drop the fast
    kernel. Torch's CPU flash kernel takes both, with the same outputs (tests/model/test_inference.py);
    scoring always has a mask (padding, title blocks), and the copies grow with the prefix each block
    reads. Training keeps the copies: with grouped heads, bf16 key/value gradients are summed in
    another order.
    """
    if torch.device(device).type != "cpu" or os.environ.get(_FORCE_GQA) is not None:  # a user's own choice stands
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)


@contextmanager
def scoring_context(device: torch.device | str, bf16: bool) -> Iterator[None]:
    """How every scoring forward runs: bf16 autocast when ``bf16``, grouped key/value heads read in place on a CPU."""
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), grouped_kv_attention(device):
        yield
