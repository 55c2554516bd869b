"""Title blocks reading one cached prefix in place score as blocks over copies of it (fp32 and bf16 autocast)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mmart.model.chooser import causal_lm_of
from mmart.model.prefix import read_blocks, repeated_cache
from mmart.model.shared_prefix import ATTENTION, read_blocks_shared, use_shared_prefix_attention
from mmart.model.testing import tiny_chooser


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # grouped query heads (4 over 2) in both
@pytest.mark.parametrize("bf16", [False, True])
def test_blocks_over_one_prefix_read_in_place_equal_blocks_over_copies(arch, bf16) -> None:
    model, _ = tiny_chooser(arch, tokens_per_artwork=1)
    llm = causal_lm_of(model)
    llm.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 200, (1, 13), generator=g)
    blocks = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (5, 7, 6, 7)]  # padded to 7
    read_at = torch.tensor([[2, 4], [3, 6], [1, 5], [0, 6]])
    tokens = torch.tensor([[7, 8], [9, 10], [11, -1], [12, 13]])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        cache = DynamicCache(config=llm.config)
        model(input_ids=prefix, attention_mask=torch.ones_like(prefix), cache=cache, use_cache=True, logits_to_keep=1)
        copies = read_blocks(model, repeated_cache(cache, len(blocks), llm.config), torch.full((4,), 13), blocks,
                             None, read_at, tokens, fill=3)
        assert use_shared_prefix_attention(model) and llm.config._attn_implementation == ATTENTION
        in_place = read_blocks_shared(model, cache, 13, blocks, None, read_at, tokens, fill=3)
    assert cache.get_seq_length() == 13  # the prefix's cache is left as it was, for the next call
    assert torch.isneginf(in_place[2, 1]) and torch.isneginf(copies[2, 1])
    finite = torch.isfinite(copies)
    tol = 0.05 if bf16 else 1e-5  # bf16: the two halves are rounded before they are merged
    torch.testing.assert_close(in_place[finite], copies[finite], atol=tol, rtol=0)


def test_eager_attention_keeps_the_copies() -> None:
    model, _ = tiny_chooser("llama")  # tiny models use eager attention
    assert not use_shared_prefix_attention(model)
