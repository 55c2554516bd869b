"""A chooser made ready for scoring gives the scores it gave before (bf16: bit for bit; fp32: merged LoRA)."""

from __future__ import annotations

import pytest
import torch

from mmart.model.checkpoint import add_lora
from mmart.model.inference import ready_for_scoring
from mmart.model.packing import collate_rows
from mmart.model.scoring import score_batch
from mmart.model.testing import letter_ids, one_decision_row, tiny_chooser, tiny_prompt_ids


def _trained_looking_chooser(arch: str):
    model, tok = tiny_chooser(arch, tokens_per_artwork=1)
    model = add_lora(model)
    torch.manual_seed(3)
    with torch.no_grad():  # a fresh LoRA is a no-op (B = 0); a trained one is not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), tok


def _batch(tok):
    rows = []
    for i, k in enumerate((3, 4)):
        ids = tiny_prompt_ids(tok, k, 1, history=f"The member watched title {i} and rated it {i + 3} of 5.")
        rows.append(one_decision_row(ids, list(range(i, i + k)), letter_ids(tok, k).tolist(), index=i))
    return collate_rows(rows, tok.pad_token_id)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied LM head (SmolLM2's way) and untied with biases
@pytest.mark.parametrize("bf16", [True, False])
def test_scores_are_unchanged_by_readying_for_scoring(arch, bf16) -> None:
    model, tok = _trained_looking_chooser(arch)
    batch = _batch(tok)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        before = score_batch(model, batch)
        what = ready_for_scoring(model, bf16)
        after = score_batch(model, batch)
    if bf16:
        assert "bf16" in what
        assert torch.equal(before, after)  # autocast computed with exactly these bf16 weights before
        assert model.get_input_embeddings().weight.dtype == torch.float32  # lookups stay fp32 (tied head untied)
        assert torch.equal(model.get_input_embeddings().weight, embed_before)
    else:
        assert "merged" in what
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(before, score_batch(add_lora(tiny_chooser(arch, tokens_per_artwork=1)[0]).eval(), batch))


@pytest.mark.parametrize("bf16", [True, False])
def test_grouped_key_value_heads_read_in_place_give_the_same_scores(bf16, monkeypatch) -> None:
    from transformers.integrations import sdpa_attention

    from mmart.model.inference import grouped_kv_attention

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    model, tok = tiny_chooser("llama", tokens_per_artwork=1)  # 4 query heads over 2 key/value heads
    model.config._attn_implementation = "sdpa"
    batch = _batch(tok)  # two prompts of different lengths: padded, so every call has a mask
    copies = []
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: copies.append(n) or x.repeat_interleave(n, 1))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        copied = score_batch(model, batch)
        assert copies, "transformers no longer copies key/value heads under a mask: this switch is moot"
        copies.clear()
        with grouped_kv_attention("cpu"):
            grouped = score_batch(model, batch)
    assert not copies
    assert torch.equal(copied, grouped)
