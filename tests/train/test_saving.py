"""Saving a trained chooser: whole or not at all, from gathered weights, in the dtype it was trained in."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
from mmart.model.checkpoint import add_lora, save_chooser
from mmart.model.testing import tiny_chooser
from mmart.train.saving import chooser_weights, write_atomically


def test_a_failed_write_leaves_the_previous_folder_and_no_temporary_one(tmp_path):
    target = tmp_path / "model"

    def good(text: str):
        return lambda tmp: (tmp / "mmart_chooser.json").write_text(text)

    write_atomically(target, good("first"))
    assert (target / "mmart_chooser.json").read_text() == "first"

    def broken(tmp: Path) -> None:
        (tmp / "adapter_model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, broken)
    assert (target / "mmart_chooser.json").read_text() == "first" and not (target / "adapter_model.safetensors").exists()
    write_atomically(target, good("second"))
    assert (target / "mmart_chooser.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind


def test_saving_from_gathered_weights_writes_what_a_plain_save_writes(tmp_path):
    model, tokenizer = tiny_chooser()
    model = add_lora(model)
    with torch.no_grad():  # a trained-looking adapter (B starts at 0) and a projector copy apart from its base
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    weights = chooser_weights(model)
    assert any("original_module" in k for k in weights)  # the frozen base projector is gathered too
    save_chooser(model, tokenizer, tmp_path / "plain")
    save_chooser(model, tokenizer, tmp_path / "gathered", weights=weights)
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        plain, gathered = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "gathered" / name))
        assert plain.keys() == gathered.keys() and plain
        for k in plain:
            assert torch.equal(plain[k], gathered[k]), k


@pytest.mark.slow
def test_a_bf16_model_stays_bf16_through_dpo_the_merge_and_predict(tiny_world, tmp_path, monkeypatch):
    """model.dtype bfloat16 (the 8B config): DPO trains on, the merge writes and predict scores a bf16 model."""
    import mmart.model.checkpoint as checkpoint
    import mmart.train.dpo as dpo
    from mmart.predict import predict
    from mmart.train.sft import run_sft
    from mmart.vision.cache import build_cache

    monkeypatch.setenv("MMART_HOME", str(tmp_path / "home"))
    c = load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [
        f"data_dir={tiny_world}", f"output_dir={tmp_path}", "model.dtype=bfloat16", "sft.max_examples=3",
        "sft.batch_size=3", "dpo.max_examples=3", "dpo.batch_size=3", "sft.save_steps=1000", "dpo.save_steps=1000"])
    build_cache(tiny_world, c.cache_dir, c.vision, c.cache, progress=False)
    c = replace(c, cache=replace(c.cache, dir=c.cache_dir))

    loaded: dict[str, torch.dtype] = {}

    def spy(name, load):
        def wrapped(*args, **kwargs):
            model, tok, spec = load(*args, **kwargs)
            loaded[name] = model.get_input_embeddings().weight.dtype
            return model, tok, spec
        return wrapped

    monkeypatch.setattr(dpo, "load_chooser", spy("dpo", dpo.load_chooser))
    run_sft(c)
    dpo_dir = dpo.run_dpo(c)
    with safe_open(str(tmp_path / "sft" / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # half an fp32 merge
    monkeypatch.setattr(checkpoint, "load_chooser", spy("predict", checkpoint.load_chooser))
    preds = predict(dpo_dir, c.data_dir, "test", None, progress=False, max_pairs=4)
    assert len(preds) > 0
    assert loaded == {"dpo": torch.bfloat16, "predict": torch.bfloat16}
