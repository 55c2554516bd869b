"""Artwork injection: where it happens, that it cannot be skipped silently, and that it survives
deep copies, TRL's fused LM head, PEFT (adapter on/off) and generate."""

from __future__ import annotations

import copy

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from mmart.model.batching import pad_artwork_ids, pad_sequences
from mmart.model.checkpoint import add_lora
from mmart.model.chooser import (
    PROJECTOR_ATTR,
    artwork_state,
    chooser_projector,
    chooser_slot_token_id,
    decoder_of,
    set_artwork_cache,
    slots_per_artwork,
)
from mmart.model.scoring import read_log_probs
from mmart.model.testing import letter_ids
from mmart.model.testing import tiny_chooser, tiny_prompt_ids

ARCHS = ["llama", "qwen2"]
T = 2  # tokens per artwork in these tests


def _batch(tokenizer):
    prompts = [tiny_prompt_ids(tokenizer, 4, T), tiny_prompt_ids(tokenizer, 3, T, history="Heat, crime.")]
    input_ids, attention_mask = pad_sequences(prompts, tokenizer.pad_token_id)
    return input_ids, attention_mask, pad_artwork_ids([[0, 1, 2, 3], [4, 5, 6]])


def _manual_embeds(model, input_ids, artwork_ids):
    """What the injection must produce, built by hand: row by row, slot by slot."""
    inner = decoder_of(model)
    state = artwork_state(model)
    embeds = inner.get_input_embeddings()(input_ids).clone()
    projector = getattr(inner, PROJECTOR_ATTR)
    for b in range(input_ids.shape[0]):
        slots = (input_ids[b] == state.slot_token_id).nonzero().flatten().tolist()
        ids = [i for i in artwork_ids[b].tolist() if i >= 0]
        vectors = projector(state.cache[ids]).reshape(-1, embeds.shape[-1])
        assert len(slots) == vectors.shape[0]
        for slot, vector in zip(slots, vectors):
            embeds[b, slot] = vector
    return embeds


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cached, emitted", [(T, 1), (1, T)])
def test_slots_receive_the_projected_artworks_in_order(arch: str, cached: int, emitted: int) -> None:
    """T slots per artwork either as T cached vectors each projected once, or one vector projected to T."""
    model, tokenizer = tiny_chooser(arch, tokens_per_artwork=cached, projector_tokens=emitted)
    assert slots_per_artwork(model) == T
    input_ids, attention_mask, artwork_ids = _batch(tokenizer)
    with torch.no_grad():
        injected = model(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=artwork_ids).logits
        expected = model(inputs_embeds=_manual_embeds(model, input_ids, artwork_ids), attention_mask=attention_mask)
        swapped_ids = artwork_ids.clone()
        swapped_ids[0, :4] = torch.tensor([3, 2, 1, 0])
        swapped = model(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=swapped_ids).logits
    torch.testing.assert_close(injected, expected.logits, rtol=0, atol=1e-5)  # batched vs per-row projection: float order differs by CPU
    assert (swapped[0] - injected[0]).abs().max() > 1e-3  # row 0 sees other images...
    torch.testing.assert_close(swapped[1], injected[1], rtol=0, atol=1e-6)  # ...row 1 does not


def test_the_forward_refuses_what_it_cannot_inject() -> None:
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    input_ids, attention_mask, artwork_ids = _batch(tokenizer)
    with pytest.raises(ValueError, match="no artwork_ids were passed"):
        model(input_ids=input_ids, attention_mask=attention_mask)
    too_few = artwork_ids.clone()
    too_few[0, 3] = -1
    with pytest.raises(ValueError, match="do not match"):
        model(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=too_few)
    with pytest.raises(ValueError, match="do not match"):
        model(input_ids=input_ids[:, :20], attention_mask=attention_mask[:, :20], artwork_ids=artwork_ids)
    with pytest.raises(IndexError, match="out of range"):
        out_of_range = torch.where(artwork_ids >= 0, artwork_ids + 100, artwork_ids)
        model(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=out_of_range)
    embeds = decoder_of(model).get_input_embeddings()(input_ids)
    with pytest.raises(ValueError, match="need input_ids"):
        model(inputs_embeds=embeds, artwork_ids=artwork_ids)
    with pytest.raises(ValueError, match="cache width"):
        set_artwork_cache(model, torch.zeros(3, T, 7))
    artwork_state(model).cache = None
    with pytest.raises(RuntimeError, match="no artwork cache"):
        model(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=artwork_ids)
    # A projector emitting 2 vectors per artwork needs twice the slots, and says so.
    wide, _ = tiny_chooser("llama", tokens_per_artwork=T, projector_tokens=2)
    with pytest.raises(ValueError, match="projector tokens 2"):
        wide(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=artwork_ids)
    # Text-only prompts need no artworks.
    text_only = torch.tensor([tiny_prompt_ids(tokenizer, 0, T)])
    model(input_ids=text_only)


def test_the_cache_is_never_a_parameter_buffer_or_checkpoint_entry_and_copies_share_it() -> None:
    model, _ = tiny_chooser("llama", tokens_per_artwork=T, num_artworks=12)
    cache = artwork_state(model).cache
    assert cache.shape == (12, T, 16)
    tensors = [*model.parameters(), *model.buffers(), *model.state_dict().values()]
    assert not any(t.data_ptr() == cache.data_ptr() for t in tensors)
    assert not any(t.shape == cache.shape for t in tensors)
    assert any(k.startswith(f"model.{PROJECTOR_ATTR}.") for k in model.state_dict())
    reference = copy.deepcopy(model)
    assert artwork_state(reference).cache is cache
    assert chooser_projector(reference) is not chooser_projector(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_trls_fused_head_calls_the_inner_model_and_still_sees_the_artworks(arch: str) -> None:
    """TRL replaces forward with a head that calls model.model(...) directly (NOTES.md)."""
    model, tokenizer = tiny_chooser(arch, tokens_per_artwork=T)
    input_ids, attention_mask, artwork_ids = _batch(tokenizer)
    fused = copy.deepcopy(model)
    add_fused_lm_head(fused)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        out = fused(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=artwork_ids,
                    labels=labels, fused_lm_head=True)
        plain = model(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=artwork_ids).logits
        expected = plain[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected = expected.masked_fill(labels[:, 1:] == -100, 0)
        swapped = fused(input_ids=input_ids, attention_mask=attention_mask, artwork_ids=artwork_ids.flip(-1),
                        labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs, expected, rtol=0, atol=1e-5)
    assert (swapped.log_probs - out.log_probs).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no artwork_ids"):
        fused(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)


def test_lora_trains_the_projector_copy_and_disabling_the_adapter_restores_the_base() -> None:
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    input_ids, attention_mask, artwork_ids = _batch(tokenizer)
    letters = letter_ids(tokenizer, 4)
    with torch.no_grad():
        base_scores = read_log_probs(model, input_ids, attention_mask, artwork_ids, letters)
    peft_model = add_lora(model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(f"{PROJECTOR_ATTR}.modules_to_save.default." in n for n in names)
    assert not any("lora_" in n and PROJECTOR_ATTR in n for n in names)  # no LoRA on the projector itself
    assert not any("lm_head" in n for n in names)
    assert any("lora_A" in n for n in names)

    loss = -read_log_probs(peft_model, input_ids, attention_mask, artwork_ids, letters)[:, 0].sum()
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if PROJECTOR_ATTR in n)
    with torch.no_grad():  # move the trained copy of the projector away from the base
        for name, param in peft_model.named_parameters():
            if "modules_to_save.default" in name:
                param.add_(0.5 * torch.randn_like(param))
        trained = read_log_probs(peft_model, input_ids, attention_mask, artwork_ids, letters)
        with peft_model.disable_adapter():
            reference = read_log_probs(peft_model, input_ids, attention_mask, artwork_ids, letters)
    assert (trained - base_scores).abs().max() > 1e-3
    torch.testing.assert_close(reference, base_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_takes_artwork_ids_and_its_first_token_is_the_scored_argmax(arch: str) -> None:
    model, tokenizer = tiny_chooser(arch, tokens_per_artwork=T)
    input_ids, attention_mask, artwork_ids = _batch(tokenizer)
    ids, mask = input_ids[:1], attention_mask[:1]
    common = dict(attention_mask=mask, artwork_ids=artwork_ids[:1], max_new_tokens=4, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, **common)
        uncached = model.generate(input_ids=ids, use_cache=False, **common)
        logits = model(input_ids=ids, attention_mask=mask, artwork_ids=artwork_ids[:1]).logits[0, -1]
    assert torch.equal(cached, uncached)
    logits[chooser_slot_token_id(model)] = float("-inf")  # generation never samples a slot
    assert int(cached[0, ids.shape[1]]) == int(logits.argmax())
    peft_model = add_lora(model)
    with torch.no_grad():
        assert torch.equal(peft_model.generate(input_ids=ids, **common), cached)
