"""Save and load: identical scores, the reference (adapter off) preserved, merged export, no cache on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mmart.errors import UserError
from mmart.model.batching import pad_artwork_ids, pad_sequences
from mmart.model.checkpoint import (
    CHOOSER_FILE,
    add_lora,
    build_chooser,
    export_merged,
    load_chooser,
    read_spec,
    save_chooser,
)
from mmart.model.chooser import set_artwork_cache
from mmart.model.scoring import read_log_probs
from mmart.model.testing import letter_ids
from mmart.model.testing import save_tiny_llm, tiny_artwork_cache, tiny_prompt_ids

T = 2


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("base") / "tiny-llama", "llama")


def _scores(model, tokenizer, reference: bool = False) -> torch.Tensor:
    prompts = [tiny_prompt_ids(tokenizer, 4, T), tiny_prompt_ids(tokenizer, 3, T, history="Heat")]
    batch = pad_sequences(prompts, tokenizer.pad_token_id)
    args = (*batch, pad_artwork_ids([[0, 1, 2, 3], [4, 5, 6]]), letter_ids(tokenizer, 4))
    with torch.no_grad():
        if reference:
            with model.disable_adapter():
                return read_log_probs(model, *args)
        return read_log_probs(model, *args)


def _trained_lora_chooser(base_folder: Path):
    torch.manual_seed(0)
    model, tokenizer = build_chooser(str(base_folder), cache_dim=16, projector_kind="mlp2x_gelu")
    set_artwork_cache(model, tiny_artwork_cache(12, T, 16))
    model = add_lora(model)
    with torch.no_grad():  # stand-in for training: move LoRA and the projector copy
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    return model.eval(), tokenizer


def _files_hold_no_cache(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            assert not any(tuple(f.get_slice(k).get_shape()) == (12, T, 16) for k in f.keys()), file


def test_saved_lora_chooser_loads_with_identical_scores_and_reference(base_folder: Path, tmp_path: Path) -> None:
    model, tokenizer = _trained_lora_chooser(base_folder)
    before, before_ref = _scores(model, tokenizer), _scores(model, tokenizer, reference=True)
    out = save_chooser(model, tokenizer, tmp_path / "chooser")
    spec = read_spec(out)
    assert spec.adapter and spec.base_model == str(base_folder) and spec.tokens_per_artwork == T
    assert {"adapter_model.safetensors", "adapter_config.json", "projector.safetensors", CHOOSER_FILE} <= {
        p.name for p in out.iterdir()
    }
    _files_hold_no_cache(out)

    loaded, loaded_tokenizer, _ = load_chooser(out)
    assert isinstance(loaded, PeftModel)
    set_artwork_cache(loaded, tiny_artwork_cache(12, T, 16))
    assert torch.equal(_scores(loaded, loaded_tokenizer), before)
    assert torch.equal(_scores(loaded, loaded_tokenizer, reference=True), before_ref)
    assert (before - before_ref).abs().max() > 1e-3


def test_merged_load_and_export_give_the_same_scores(base_folder: Path, tmp_path: Path) -> None:
    model, tokenizer = _trained_lora_chooser(base_folder)
    before = _scores(model, tokenizer)
    saved = save_chooser(model, tokenizer, tmp_path / "chooser")

    merged, merged_tokenizer, _ = load_chooser(saved, merge=True)
    assert not isinstance(merged, PeftModel)
    set_artwork_cache(merged, tiny_artwork_cache(12, T, 16))
    torch.testing.assert_close(_scores(merged, merged_tokenizer), before, rtol=1e-5, atol=1e-5)  # merging reorders float sums

    exported = export_merged(saved, tmp_path / "merged")
    assert json.loads((exported / CHOOSER_FILE).read_text())["base_model"] == "."
    _files_hold_no_cache(exported)
    standalone, standalone_tokenizer, _ = load_chooser(exported)
    set_artwork_cache(standalone, tiny_artwork_cache(12, T, 16))
    torch.testing.assert_close(_scores(standalone, standalone_tokenizer), before, rtol=1e-5, atol=1e-5)
    # The LLM part is a plain transformers folder: no projector keys in its weights.
    plain, info = AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]


def test_chooser_without_adapter_round_trips(base_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, tokenizer = build_chooser(str(base_folder), cache_dim=16, projector_kind="linear")
    set_artwork_cache(model, tiny_artwork_cache(12, T, 16))
    before = _scores(model, tokenizer)
    out = save_chooser(model, tokenizer, tmp_path / "plain")
    assert not read_spec(out).adapter
    loaded, loaded_tokenizer, _ = load_chooser(out)
    set_artwork_cache(loaded, tiny_artwork_cache(12, T, 16))
    assert torch.equal(_scores(loaded, loaded_tokenizer), before)


def test_loading_a_folder_that_is_not_a_chooser_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a saved mmart chooser"):
        load_chooser(tmp_path)


def test_stacked_dpo_adapter_scores_as_the_merged_sft_model_with_its_adapter(base_folder: Path, tmp_path: Path) -> None:
    """DPO trains a second adapter on the merged SFT model; stacked onto SFT's base, it scores the same alone."""
    from mmart.model.checkpoint import lora_config, stack_adapter

    sft, tokenizer = _trained_lora_chooser(base_folder)
    sft_ref = _scores(sft, tokenizer, reference=True)
    sft_dir = save_chooser(sft, tokenizer, tmp_path / "sft")
    merged, merged_tokenizer, _ = load_chooser(export_merged(sft_dir, tmp_path / "merged"))
    set_artwork_cache(merged, tiny_artwork_cache(12, T, 16))
    torch.manual_seed(1)
    dpo = add_lora(merged, lora_config(r=4, alpha=12, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in dpo.named_parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    dpo.eval()
    before = _scores(dpo, merged_tokenizer)
    dpo_dir = save_chooser(dpo, merged_tokenizer, tmp_path / "dpo")

    stack_adapter(sft_dir, dpo_dir)
    assert read_spec(dpo_dir).base_model == str(base_folder)
    assert json.loads((dpo_dir / "adapter_config.json").read_text())["r"] == 16 + 4
    shutil.rmtree(tmp_path / "merged")  # the stacked folder needs neither the merged model nor the SFT folder
    shutil.rmtree(sft_dir)
    stacked, stacked_tokenizer, _ = load_chooser(dpo_dir)
    set_artwork_cache(stacked, tiny_artwork_cache(12, T, 16))
    torch.testing.assert_close(_scores(stacked, stacked_tokenizer), before, rtol=1e-4, atol=1e-4)
    # The adapter switched off is SFT's base (its stage-0 projector, the plain LLM), not the SFT model.
    torch.testing.assert_close(_scores(stacked, stacked_tokenizer, reference=True), sft_ref, rtol=1e-5, atol=1e-5)
