"""SFT: predict the played artwork's letter (loss on the answer only), on TRL's SFTTrainer.

Run as: ``mmart sft --config configs/default.yaml`` (resumes from its last checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from mmart.config import PipelineConfig, to_dict
from mmart.distributed import distributed_state
from mmart.model.batching import pad_artwork_ids
from mmart.model.checkpoint import add_lora, build_chooser, lora_config, resolve_base_model, save_chooser
from mmart.model.chooser import chooser_projector, set_artwork_cache
from mmart.train.align import align_projector, word_targets
from mmart.train.common import (
    ProjectorLRMixin,
    common_args,
    last_checkpoint,
    load_inputs,
    save_curves,
    trainable_digest,
)
from mmart.train.data import cache_rows, sft_dataset, subsample


@dataclass
class ArtworkSFTCollator(DataCollatorForLanguageModeling):
    """TRL's collator (padding, labels) plus the artwork rows, padded with -1 (TRL's would drop them)."""

    def torch_call(self, examples):
        out = super().torch_call([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
        out["artwork_ids"] = pad_artwork_ids([e["artwork_ids"] for e in examples])
        return out


class ArtworkSFTTrainer(ProjectorLRMixin, SFTTrainer):
    """SFTTrainer with a separate projector learning rate; the artworks ride in the batch as ``artwork_ids``."""


def build_model(cfg: PipelineConfig, cache=None, contract=None):
    """A fresh chooser with LoRA. Seeded (projector init and its stage-0 alignment), so a resumed run
    rebuilds exactly the same base before loading the checkpoint."""
    m = cfg.model
    resolve_base_model(m.base_model)  # first use converts or builds it (and touches the RNG): before seeding
    torch.manual_seed(m.seed)
    model, tokenizer = build_chooser(m.base_model, cache.dim if cache is not None else 8, m.projector, m.dtype,
                                     m.attn_implementation, m.trust_remote_code)
    if cache is not None:
        set_artwork_cache(model, cache.embeddings)
        if m.projector_init != "random" and contract is not None:
            projector = chooser_projector(model)
            targets = word_targets(contract, cache.artwork_ids, tokenizer, model.get_input_embeddings(), m.projector_init)
            stats = align_projector(projector, cache.embeddings, targets, m.projector_init_steps, seed=m.seed)
            print(f"[mmart] projector aligned to the LLM's embeddings of artwork {m.projector_init}: "
                  f"loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f} in {stats['seconds']:.1f}s")
    return add_lora(model, lora_config(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target)), tokenizer


def run_sft(cfg: PipelineConfig, out_dir: str | Path | None = None, callbacks: list | None = None) -> Path:
    """Train, save the chooser to ``<out>/model`` and the curves to ``<out>/model/curves.png``."""
    out = Path(out_dir or f"{cfg.output_dir}/sft")
    start = time.perf_counter()
    distributed_state()  # before the Trainer: CPU processes join one gloo group
    inputs = load_inputs(cfg)
    examples = subsample(inputs.builder.choice_examples("train"), cfg.sft.max_examples, cfg.sft.seed,
                         cfg.sft.propensity_clip)
    model, tokenizer = build_model(cfg, inputs.cache, inputs.contract)
    data = sft_dataset(inputs.builder, examples, tokenizer, cache_rows(inputs.cache))
    args = SFTConfig(**common_args(cfg.sft, out), max_length=None, packing=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, weight_decay=cfg.sft.weight_decay,
                     **cfg.sft.extra)
    trainer = ArtworkSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                data_collator=ArtworkSFTCollator(pad_token_id=tokenizer.pad_token_id),
                                callbacks=callbacks)
    trainer.projector_lr = cfg.sft.projector_lr
    resume = last_checkpoint(out)
    if resume:
        print(f"[mmart sft] resuming from {resume}")
    print(f"[mmart sft] {len(data)} examples, {trainer.args.num_train_epochs} epoch(s), batch "
          f"{cfg.sft.batch_size}x{cfg.sft.grad_accum}")
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.args.process_index
    print(f"[mmart sft] rank {rank} trainable weights sha256 {trainable_digest(trainer.model)}")
    model_dir = out / "model"
    if trainer.is_world_process_zero():
        save_chooser(trainer.model, tokenizer, model_dir)
        (model_dir / "pipeline.yaml").write_text(_yaml(cfg))
        save_curves(trainer.state.log_history, model_dir / "curves.png", ("loss", "grad_norm", "learning_rate"))
        print(f"[mmart sft] saved {model_dir} in {time.perf_counter() - start:.0f}s")
    return model_dir


def _yaml(cfg: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
