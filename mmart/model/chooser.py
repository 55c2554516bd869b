"""The multimodal chooser: a causal LM that sees candidate artworks as projected embedding vectors.

Shape letters: B batch, L sequence length, M artworks named per prompt (padded with -1),
N artworks in the cache, T vectors per artwork (``tokens_per_artwork``), D cache width,
H LLM hidden size.

How a prompt is laid out (what the examples module must produce)
-----------------------------------------------------------------
* Render the conversation with the LLM's own chat template; where a candidate's image
  belongs, write the slot token (``SLOT_TOKEN``, ``<artwork>``) T * E times in a row
  (E = the projector's outputs per cached vector, ``slots_per_artwork(model)``), e.g.
  ``"A <artwork><artwork>\\nB <artwork><artwork>\\n"`` for T * E = 2. The slot token is an added
  special token, so each copy is exactly one token id (``chooser_slot_token_id(model)``),
  whatever surrounds it; tokenize the rendered text with ``add_special_tokens=False``.
* ``artwork_ids[b]`` lists the cache rows of the artworks of prompt b **in the order
  their slots appear**, padded with -1 on the right: ``[B, M]`` long. Prompt b must hold
  exactly ``T * E * (number of ids >= 0 in artwork_ids[b])`` slot tokens; anything else raises.
* The answer (SFT target, DPO completion, scored letter) follows the generation prompt:
  with ChatML, the first assistant token, e.g. ``A``.

Why the injection lives in a forward pre-hook on the inner decoder model
------------------------------------------------------------------------
TRL's SFT and DPO trainers replace ``model.forward`` with a fused LM-head forward that
calls the inner model (``model.model(**kwargs)``) directly; an injection written in the
outer ``...ForCausalLM.forward`` would then be skipped without any error (docs/architecture.md). Every
path (plain forward, ``generate``, PEFT, TRL's fused head) goes through the inner model's
``__call__``, so a pre-hook there sees ``input_ids`` and ``artwork_ids`` and swaps them for
``inputs_embeds`` with the projected vectors written at the slots (``masked_scatter``, as
transformers' LLaVA does). Composition would be simpler to read, but TRL patches, copies
and unwraps the model it is given, so the chooser has to *be* the causal LM.

What is attached to the causal LM
---------------------------------
* ``llm.base_model.artwork_projector``: the projector, a real submodule, so it is trained,
  moved and (through PEFT's ``modules_to_save``) saved and switched off with the adapter.
* ``llm.base_model.mmart_artworks``: an ``ArtworkState`` (slot token id and the cache
  tensor ``[N, T, D]``). The cache is a plain attribute, never a parameter or buffer, so it
  is in no state dict or checkpoint, and DDP does not broadcast it every step. A deep copy
  of the model (a frozen reference) shares it instead of duplicating it.
* Instance-level ``forward`` and ``prepare_inputs_for_generation`` that accept
  ``artwork_ids`` explicitly, so ``generate(..., artwork_ids=...)`` passes transformers'
  model-kwargs validation, and decoding steps (no slots in the new tokens) drop them.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mmart.model.llm import SLOT_TOKEN
from mmart.model.projector import ArtworkProjector

PROJECTOR_ATTR = "artwork_projector"
STATE_ATTR = "mmart_artworks"


class ArtworkState:
    """Slot token id and the device-resident artwork cache ``[N, T, D]`` of one chooser.

    Deep copies return the same object: a frozen reference copy of the model reads the
    same cache, and replacing the cache (``set_artwork_cache``) updates both.
    """

    def __init__(self, slot_token_id: int, slot_token: str = SLOT_TOKEN, base_model: str | None = None) -> None:
        self.slot_token_id = int(slot_token_id)
        self.slot_token = slot_token
        self.base_model = base_model  # what save_chooser records as the base (hub id, folder, "default")
        self.cache: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> ArtworkState:
        return self

    def rows(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Cache rows ``[n, T, D]`` for ``ids`` ``[n]``; moves the cache to ``device`` once if needed."""
        if self.cache is None:
            raise RuntimeError("the chooser has no artwork cache: call set_artwork_cache(model, cache) first")
        if self.cache.device != device:
            # Accelerate/Trainer move the model after the cache was set; follow it once, not every step.
            self.cache = self.cache.to(device)
        num = self.cache.shape[0]
        if ids.numel() and int(ids.max()) >= num:
            raise IndexError(f"artwork id {int(ids.max())} is out of range for a cache of {num} artworks")
        return self.cache[ids.to(device)]


def decoder_of(model: nn.Module) -> nn.Module:
    """The inner decoder model of a causal LM, possibly wrapped by PEFT or accelerate.

    It is what TRL's fused head calls (``getattr(model, "base_model")``), i.e. the module
    named by ``base_model_prefix`` (``model`` for Llama, Qwen2, Mistral, ...).
    """
    llm = causal_lm_of(model)
    inner = llm.base_model
    if inner is llm or not hasattr(inner, "get_input_embeddings"):
        raise TypeError(
            f"{type(llm).__name__} has no inner decoder model under `{llm.base_model_prefix}`; the chooser needs the "
            "usual `...ForCausalLM` with an inner `...Model`"
        )
    return inner


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """Unwrap DDP/accelerate (``.module``) and PEFT (``get_base_model()``) to the causal LM."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers causal LM (or a PEFT/DDP wrapper of one), got {type(model).__name__}")
    return model


def attach_artworks(
    llm: PreTrainedModel,
    projector: ArtworkProjector,
    slot_token_id: int,
    cache: torch.Tensor | None = None,
    slot_token: str = SLOT_TOKEN,
    base_model: str | None = None,
) -> PreTrainedModel:
    """Turn a causal LM into the chooser, in place, and return it.

    Call before wrapping with PEFT (``get_peft_model``) or handing it to a trainer.
    ``projector`` maps ``[..., T, D] -> [..., T * E, H]``; ``cache`` ``[N, T, D]`` may be set later;
    ``slot_token`` and ``base_model`` are only recorded, for ``save_chooser``.
    """
    if hasattr(llm, "get_base_model") or not isinstance(llm, PreTrainedModel):
        raise TypeError("attach_artworks needs the bare causal LM, before PEFT or accelerate wrap it")
    inner = decoder_of(llm)
    hidden = inner.get_input_embeddings().weight.shape[1]
    if projector.config.out_dim != hidden:
        raise ValueError(f"projector out_dim {projector.config.out_dim} != LLM hidden size {hidden}")
    if slot_token_id >= inner.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"slot token id {slot_token_id} is outside the embedding matrix")

    inner.add_module(PROJECTOR_ATTR, projector)
    if not isinstance(getattr(inner, STATE_ATTR, None), ArtworkState):
        inner.register_forward_pre_hook(_inject_artworks, with_kwargs=True)
    setattr(inner, STATE_ATTR, ArtworkState(slot_token_id, slot_token, base_model))
    # Bound with MethodType (no closure over llm), so a deep copy of the model rebinds them to the copy.
    cls = type(llm)
    llm.forward = types.MethodType(_with_artwork_ids(_forward_with_artworks, cls.forward), llm)
    llm.prepare_inputs_for_generation = types.MethodType(
        _with_artwork_ids(_prepare_inputs_with_artworks, cls.prepare_inputs_for_generation), llm
    )
    # A generated slot token would need an artwork that does not exist; never sample it.
    generation_config = getattr(llm, "generation_config", None)
    if generation_config is not None:
        suppressed = list(generation_config.suppress_tokens or [])
        if slot_token_id not in suppressed:
            generation_config.suppress_tokens = suppressed + [slot_token_id]
    if cache is not None:
        set_artwork_cache(llm, cache)
    return llm


def artwork_state(model: nn.Module) -> ArtworkState:
    """The chooser's ``ArtworkState``; raises if ``model`` is not a chooser."""
    state = getattr(decoder_of(model), STATE_ATTR, None)
    if not isinstance(state, ArtworkState):
        raise TypeError("this model has no artwork slots: build it with attach_artworks() or load_chooser()")
    return state


def chooser_projector(model: nn.Module) -> nn.Module:
    """The projector module (under PEFT, its ``ModulesToSaveWrapper``)."""
    artwork_state(model)
    return getattr(decoder_of(model), PROJECTOR_ATTR)


def chooser_slot_token_id(model: nn.Module) -> int:
    return artwork_state(model).slot_token_id


def set_artwork_cache(model: nn.Module, cache: torch.Tensor, device: torch.device | str | None = None) -> None:
    """Install the artwork cache ``[N, T, D]`` (never saved; call after every load).

    Placed on ``device``, by default the device of the LLM's embeddings, so gathering the
    candidates' rows never leaves the accelerator. Kept in its own dtype (fp16 halves the
    memory of a large cache); rows are cast to the projector's dtype when gathered.
    """
    if cache.ndim != 3:
        raise ValueError(f"the artwork cache must be [num_artworks, tokens_per_artwork, dim], got {tuple(cache.shape)}")
    projector = chooser_projector(model)
    in_dim = _projector_config(projector).in_dim
    if cache.shape[-1] != in_dim:
        raise ValueError(f"artwork cache width {cache.shape[-1]} != projector in_dim {in_dim}")
    if device is None:
        device = decoder_of(model).get_input_embeddings().weight.device
    artwork_state(model).cache = cache.detach().to(device)


def _projector_config(projector: nn.Module):
    # Under PEFT the projector is wrapped; the original module keeps the config.
    base = getattr(projector, "original_module", projector)
    return base.config


def slots_per_artwork(model: nn.Module) -> int:
    """Prompt slots per artwork: the cache's vectors per artwork x the projector's outputs per vector."""
    return _slots_per_artwork(decoder_of(model))


def _slots_per_artwork(inner: nn.Module) -> int:
    state: ArtworkState = getattr(inner, STATE_ATTR)
    if state.cache is None:
        raise RuntimeError("the chooser has no artwork cache: call set_artwork_cache(model, cache) first")
    return int(state.cache.shape[1]) * _projector_config(getattr(inner, PROJECTOR_ATTR)).tokens


def project_artworks(inner: nn.Module, artwork_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Projected vectors ``[n_valid * T * E, H]`` for the valid (>= 0) ids of ``artwork_ids`` ``[B, M]``.

    Row-major order (prompt 0's artworks first, each in its listed order, each artwork's
    T * E vectors in order) is the order ``masked_scatter`` fills the slots in.
    """
    state: ArtworkState = getattr(inner, STATE_ATTR)
    projector = getattr(inner, PROJECTOR_ATTR)
    rows = state.rows(artwork_ids[artwork_ids >= 0], device)  # [n_valid, T, D]
    dtype = next(projector.parameters()).dtype
    return projector(rows.to(device=device, dtype=dtype)).flatten(0, 1)


def _inject_artworks(
    inner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook of the inner model: ``input_ids`` + ``artwork_ids`` -> ``inputs_embeds``."""
    state: ArtworkState = getattr(inner, STATE_ATTR)
    artwork_ids = kwargs.pop("artwork_ids", None)
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args:
        if len(args) > 1:
            raise TypeError("the chooser's inner model must be called with keyword arguments past input_ids")
        input_ids, args = args[0], ()
        kwargs["input_ids"] = input_ids
    if input_ids is None:
        if artwork_ids is not None:
            raise ValueError("artwork_ids need input_ids (to find the slots), not inputs_embeds")
        return args, kwargs

    slot_mask = input_ids == state.slot_token_id  # [B, L]
    slots_per_row = slot_mask.sum(dim=-1)
    if artwork_ids is None:
        if bool(slots_per_row.any()):
            raise ValueError(
                f"the input holds {int(slots_per_row.sum())} artwork slot tokens but no artwork_ids were passed: "
                "pass artwork_ids=[B, M] cache rows with every forward (TRL: keep the column in the batch)"
            )
        return args, kwargs
    if artwork_ids.ndim == 1:
        artwork_ids = artwork_ids.unsqueeze(0)
    if artwork_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"artwork_ids has {artwork_ids.shape[0]} rows for a batch of {input_ids.shape[0]}")
    if not bool(slots_per_row.any()) and _is_decoding_step(kwargs):
        return args, kwargs  # generation past the prompt: the artworks are already in the KV cache
    if not bool(slots_per_row.any()) and not bool((artwork_ids >= 0).any()):
        return args, kwargs  # text-only prompts (caption variant): padding rows only, nothing to inject

    per_artwork = _slots_per_artwork(inner)
    expected = (artwork_ids >= 0).sum(dim=-1).to(slots_per_row.device) * per_artwork
    if not torch.equal(expected, slots_per_row):
        bad = (expected != slots_per_row).nonzero().flatten().tolist()[:5]
        raise ValueError(
            "artwork vectors and slot tokens do not match: rows "
            f"{bad} have slots {slots_per_row[bad].tolist()} but artworks x slots per artwork = "
            f"{expected[bad].tolist()} (cache tokens_per_artwork {int(state.cache.shape[1])} x projector tokens "
            f"{per_artwork // int(state.cache.shape[1])}). Each artwork in artwork_ids needs exactly that many "
            "consecutive slot tokens in its prompt: build prompts with PromptEncoder(..., slots_per_artwork(model))."
        )

    embeds = inner.get_input_embeddings()(input_ids)  # [B, L, H]
    vectors = project_artworks(inner, artwork_ids, embeds.device).to(embeds.dtype)  # [n_slots, H]
    embeds = embeds.masked_scatter(slot_mask.unsqueeze(-1), vectors)
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = embeds
    return args, kwargs


def _is_decoding_step(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return False
    try:
        return int(cache.get_seq_length()) > 0
    except (AttributeError, TypeError):
        return False


def _with_artwork_ids(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``wrapper`` whose signature is ``original``'s plus ``artwork_ids``.

    ``generate`` validates its model kwargs by parameter *name* against these signatures
    (``attention_mask``, ...), so a bare ``(*args, artwork_ids, **kwargs)`` would fail it.
    """

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(self, *args, **kwargs)

    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    extra = inspect.Parameter("artwork_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    if "artwork_ids" not in signature.parameters:
        params.insert(at, extra)
    method.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    method.__name__ = original.__name__
    method.__doc__ = wrapper.__doc__
    return method


def _forward_with_artworks(self: PreTrainedModel, *args: Any, artwork_ids: torch.Tensor | None = None, **kwargs: Any):
    """The class forward, with ``artwork_ids`` ``[B, M]`` named so ``generate`` accepts it.

    ``artwork_ids`` travels in ``**kwargs`` to the inner model, where the pre-hook uses it.
    """
    if artwork_ids is not None:
        kwargs["artwork_ids"] = artwork_ids
    return type(self).forward(self, *args, **kwargs)


def _prepare_inputs_with_artworks(
    self: PreTrainedModel, input_ids: torch.Tensor, *args: Any, artwork_ids: torch.Tensor | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Generation inputs for one step; ``artwork_ids`` only when this step's tokens hold slots.

    The prefill step (or every step without a KV cache) carries the prompt's slots;
    decoding steps only carry new tokens, whose artworks already sit in the KV cache.
    """
    inputs = type(self).prepare_inputs_for_generation(self, input_ids, *args, **kwargs)
    step_ids = inputs.get("input_ids")
    if artwork_ids is not None and step_ids is not None:
        if bool((step_ids == artwork_state(self).slot_token_id).any()):
            inputs["artwork_ids"] = artwork_ids
    return inputs
