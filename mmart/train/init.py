"""The untrained chooser: the LLM, a projector aligned by stage 0, a fresh LoRA adapter.

``mmart init`` saves it to ``<output_dir>/init/model``: the zero-shot baseline the report
scores, and the projector SFT starts from. Stage 0 (``mmart.train.align``) runs once, on the
training device, in the main process; SFT loads its result from ``init/model`` instead of
fitting it again in every rank, and refits it (through ``ensure_init``) when what it was
fitted on (model settings, cache, dataset) has changed.

Run as: ``mmart init --config configs/default.yaml``
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmart.artefacts import made_from, stale, write_model_record
from mmart.config import PipelineConfig, to_dict
from mmart.model.checkpoint import PROJECTOR_FILE, add_lora, build_chooser, lora_config, resolve_base_model, save_chooser
from mmart.log import say
from mmart.model.card import write_model_card
from mmart.model.chooser import chooser_projector, set_artwork_cache


def build_model(cfg: PipelineConfig, cache=None, contract=None, init_dir: str | Path | None = None):
    """A fresh chooser with LoRA, seeded, so a resumed run rebuilds exactly the same base.

    The projector comes from ``init_dir`` (a saved init model) when given, else from stage 0
    here (``model.projector_init``: fitted to the LLM's embeddings of each artwork's tags), on
    the training device.
    """
    from mmart.train.common import device

    m = cfg.model
    resolve_base_model(m.base_model)  # first use converts or builds it (and touches the RNG): before seeding
    torch.manual_seed(m.seed)
    model, tokenizer = build_chooser(m.base_model, cache.dim if cache is not None else 8, m.projector, m.dtype,
                                     m.attn_implementation, m.trust_remote_code, projector_tokens=m.projector_tokens)
    from mmart.distributed import launched_mode

    if launched_mode() == "ddp":  # FSDP / DeepSpeed place the (sharded) weights themselves
        model.to(device())  # the LLM, the projector and (set below) the cache on one device from the start
    if cache is not None:
        projector = chooser_projector(model)
        if init_dir is not None:
            from safetensors.torch import load_file

            projector.load_state_dict(load_file(str(Path(init_dir) / PROJECTOR_FILE)))
        elif m.projector_init != "random" and contract is not None:
            from mmart.train.align import align_projector, word_targets

            dev = device()
            model.to(dev)  # stage 0 on the training device: the projector, the LLM's embeddings, the cache
            set_artwork_cache(model, cache.embeddings, dev)
            targets = word_targets(contract, cache.artwork_ids, tokenizer, model.get_input_embeddings(), m.projector_init,
                                   slots=m.projector_tokens)
            stats = align_projector(projector, cache.embeddings.to(dev), targets, m.projector_init_steps, seed=m.seed)
            say(f"[mmart] stage 0: projector aligned to the LLM's embeddings of artwork {m.projector_init} on {dev}: "
                f"loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f} in {stats['seconds']:.1f}s")
        set_artwork_cache(model, cache.embeddings, device())  # loaded there once; never copied to another device
    return add_lora(model, lora_config(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target)), tokenizer


def run_init(cfg: PipelineConfig, inputs=None) -> Path:
    """Build the untrained chooser (stage 0 included) and save it with its record."""
    import yaml

    from mmart.train.common import load_inputs
    from mmart.train.trainers import check_trainer_extras

    check_trainer_extras(cfg)  # the whole config (sft.extra, dpo.extra too), before anything is written
    inputs = inputs or load_inputs(cfg)
    model, tokenizer = build_model(cfg, inputs.cache, inputs.contract)
    out = save_chooser(model, tokenizer, Path(cfg.output_dir) / "init" / "model")
    (out / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_model_record(out, made_from(cfg, "init"))
    write_model_card(out)
    say(f"[mmart init] saved {out}")
    return out


def ensure_init(cfg: PipelineConfig, inputs=None) -> Path | None:
    """The init model SFT starts from, rebuilt first (main process only) if missing or stale.

    None when there is no stage 0 to reuse (caption prompts, or ``projector_init: random``).
    """
    from mmart.distributed import distributed_state

    if cfg.prompt.artwork_input != "embeddings" or cfg.model.projector_init == "random":
        return None
    folder = Path(cfg.output_dir) / "init" / "model"
    state = distributed_state()
    with state.main_process_first():
        if state.is_main_process:
            why = stale(folder, made_from(cfg, "init"))
            if why:
                say(f"[mmart] init: {folder} {'; '.join(why)}; running stage 0 once")
                run_init(cfg, inputs)
    return folder
