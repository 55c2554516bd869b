"""Many title blocks over one shared member prefix: the prefix's keys read once for all of them.

The home-page API scores N title blocks that all continue the same cached prefix. As rows of a
batch (``mmart.model.prefix.read_blocks``), each row holds its own copy of the prefix's keys and
values (N copies, per layer) and attends under a mask, which keeps SDPA off its mask-free paths.
Attention splits exactly in two (cascade attention): every block token's attention to the prefix,
and its causal attention to its own block, each normalised on its own and merged by their
log-sum-exp. Here

1. the prefix part is one mask-free SDPA call: all blocks' queries as one long sequence against the
   prefix's keys, which are read once (grouped query heads stacked along the sequence, so
   grouped-query models need no per-head copies either);
2. the own part is one causal SDPA call over the blocks, each its own row (right padding sits after
   every real token, so the causal mask alone keeps it unseen);
3. the two are merged in fp32.

It runs as an attention function registered with transformers (``AttentionInterface``) under the
name ``ATTENTION``; a forward that passes ``shared_prefix=<the prefix's cache>`` takes this path,
any other forward falls through to transformers' SDPA. The scores equal those of each title's own
prompt (tests/test_serve.py). CPU only: it calls torch's CPU flash kernel, the one that returns the
log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "mmart_shared_prefix"


def shared_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            shared_prefix=None, **kwargs):
    """transformers' attention-function signature; ``shared_prefix``: the one-row cache every row continues."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # As SDPA under autocast: every operand in the autocast dtype (RoPE leaves queries and keys in fp32).
    kind = query.device.type
    dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else query.dtype
    query, key, value = query.to(dt), key.to(dt), value.to(dt)
    layer = shared_prefix.layers[module.layer_idx]
    kp, vp = layer.keys.to(dt), layer.values.to(dt)  # [1, Hkv, P, d]
    n, h, t, d = query.shape
    groups = kp.shape[1]
    rep = h // groups
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # 1. Every block token against the prefix: [1, Hkv, rep * N * T, d] queries, the prefix's keys once.
    q1 = query.view(n, groups, rep, t, d).permute(1, 2, 0, 3, 4).reshape(1, groups, rep * n * t, d)
    o1, l1 = flash(q1, kp, vp, scale=scaling)[:2]
    o1 = o1.view(groups, rep, n, t, d).permute(2, 0, 1, 3, 4).reshape(n, h, t, d)
    l1 = l1.view(groups, rep, n, t).permute(2, 0, 1, 3).reshape(n, h, t)
    # 2. Every block token against its own block, causally.
    o2, l2 = flash(query, repeat_kv(key, rep), repeat_kv(value, rep), is_causal=True, scale=scaling)[:2]
    # 3. The two softmaxes as one.
    top = torch.maximum(l1, l2)
    w1, w2 = (l1 - top).exp().unsqueeze(-1), (l2 - top).exp().unsqueeze(-1)
    out = (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``ATTENTION`` an attention implementation transformers knows (masks as SDPA's); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION


def usable(model: nn.Module) -> bool:
    """Whether ``model``'s attention can take this path: SDPA (which it falls back to) on a CPU."""
    from mmart.model.chooser import causal_lm_of

    llm = causal_lm_of(model)
    impl = getattr(llm.config, "_attn_implementation", None)
    return next(model.parameters()).device.type == "cpu" and impl in ("sdpa", ATTENTION)


def use_shared_prefix_attention(model: nn.Module) -> bool:
    """Switch ``model``'s attention to ``ATTENTION`` where ``usable``; whether it did."""
    from mmart.model.chooser import causal_lm_of

    if not usable(model):
        return False
    llm = causal_lm_of(model)
    llm.set_attn_implementation(register())
    return True


def read_blocks_shared(model: nn.Module, prefix_cache, prefix_length: int, block_ids: list[list[int]],
                       artwork_ids: torch.Tensor | None, read_at: torch.Tensor, tokens: torch.Tensor, fill: int = 0
                       ) -> torch.Tensor:
    """As ``mmart.model.prefix.read_blocks``, for N blocks that all continue the one-row ``prefix_cache``
    (left as it is); the model's attention must be ``ATTENTION`` (``use_shared_prefix_attention``)."""
    from mmart.model.scoring import logits_at, token_log_probs

    dev = read_at.device
    t_max = max(len(x) for x in block_ids)
    ids = torch.tensor([x + [fill] * (t_max - len(x)) for x in block_ids], device=dev)
    positions = (prefix_length + torch.arange(t_max, device=dev)).expand(len(block_ids), -1)
    # The mask only shapes what transformers prepares; this attention reads the prefix and the causal
    # order itself (padding sits after every real token of its row).
    mask = torch.ones_like(ids)
    logits = logits_at(model, ids, mask, artwork_ids, read_at.clamp(min=0), positions,
                       extra={"shared_prefix": prefix_cache})
    return token_log_probs(logits, tokens)
