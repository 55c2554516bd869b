"""SFT on TRL's SFTTrainer: the played artwork is the target.

``prompt.answer: letter``: TRL's own loss on the answer letter (labels masked to it).
``prompt.answer: per_candidate``: a softmax over the K candidates' scores (log p(" yes") at
each candidate's position), cross-entropy against the played one, in ``compute_loss``.

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
from mmart.model.batching import candidate_batch, pad_artwork_ids, pad_candidates
from mmart.model.scoring import score_letters
from mmart.model.checkpoint import add_lora, build_chooser, lora_config, resolve_base_model, save_chooser
from mmart.model.chooser import chooser_projector, set_artwork_cache
from mmart.train.align import align_projector, word_targets
from mmart.train.common import (
    ProjectorLRMixin,
    common_args,
    freeze_projector_if_zero_lr,
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
        if "score_positions" in examples[0]:
            out.update(candidate_batch(examples))
            out["chosen"] = torch.tensor([int(e["chosen"]) for e in examples], dtype=torch.long)
        if "target_probs" in examples[0]:
            out["target_probs"] = pad_candidates([e["target_probs"] for e in examples], 0.0, torch.float32)
        return out


class ArtworkSFTTrainer(ProjectorLRMixin, SFTTrainer):
    """SFTTrainer with a separate projector learning rate; the artworks ride in the batch as ``artwork_ids``.

    Batches with ``score_positions`` (per_candidate) are trained with a listwise loss instead of TRL's token loss.
    """

    teacher_weight: float = 0.5

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        if "score_positions" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scores = score_letters(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("artwork_ids"),
                               inputs["answer_ids"], inputs["score_positions"])  # [B, K]
        loss = torch.nn.functional.cross_entropy(scores, inputs["chosen"])
        mode = "train" if model.training else "eval"
        if "target_probs" in inputs:  # distillation towards the teacher's choice distribution
            log_p = torch.log_softmax(scores, -1).masked_fill(inputs["answer_ids"] < 0, 0.0)
            soft = -(inputs["target_probs"] * log_p).sum(-1).mean()
            self._metrics[mode]["teacher_ce"].append(soft.item())
            w = self.teacher_weight
            loss = (1 - w) * loss + w * soft
        self._metrics[mode]["choice_accuracy"].append(
            (scores.argmax(-1) == inputs["chosen"]).float().mean().item())
        return (loss, {"scores": scores}) if return_outputs else loss


def build_model(cfg: PipelineConfig, cache=None, contract=None):
    """A fresh chooser with LoRA. Seeded (projector init and its stage-0 alignment), so a resumed run
    rebuilds exactly the same base before loading the checkpoint."""
    m = cfg.model
    resolve_base_model(m.base_model)  # first use converts or builds it (and touches the RNG): before seeding
    torch.manual_seed(m.seed)
    model, tokenizer = build_chooser(m.base_model, cache.dim if cache is not None else 8, m.projector, m.dtype,
                                     m.attn_implementation, m.trust_remote_code, projector_tokens=m.projector_tokens)
    if cache is not None:
        set_artwork_cache(model, cache.embeddings)
        if m.projector_init != "random" and contract is not None:
            projector = chooser_projector(model)
            targets = word_targets(contract, cache.artwork_ids, tokenizer, model.get_input_embeddings(), m.projector_init,
                                   slots=m.projector_tokens)
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
    teacher = None
    if cfg.sft.teacher == "reward_model":
        from mmart.eval.reward_model import fit_reward_model

        teacher = fit_reward_model(inputs.contract, "train")
        print(f"[mmart sft] teacher: logistic reward model on the train logs, weight {cfg.sft.teacher_weight}")
    data = sft_dataset(inputs.builder, examples, tokenizer, cache_rows(inputs.cache), teacher,
                       cfg.sft.teacher_temperature)
    if freeze_projector_if_zero_lr(model, cfg.sft.projector_lr):
        print("[mmart sft] projector frozen (sft.projector_lr = 0): the slots keep their stage-0 word alignment")
    shared = common_args(cfg.sft, out, slots=cfg.prompt.artwork_input == "embeddings")
    args = SFTConfig(**shared, max_length=None, packing=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, weight_decay=cfg.sft.weight_decay,
                     **cfg.sft.extra)
    trainer = ArtworkSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                data_collator=ArtworkSFTCollator(pad_token_id=tokenizer.pad_token_id),
                                callbacks=callbacks)
    trainer.projector_lr = cfg.sft.projector_lr
    trainer.teacher_weight = cfg.sft.teacher_weight
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
