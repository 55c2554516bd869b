"""SFT on TRL's SFTTrainer: a listwise loss over each decision's candidates.

Each decision's candidates are scored by the readout (``mmart.model.readout``) in one
forward over a packed row (one member prefix, several title blocks); the loss is the
cross-entropy of the softmax over the K scores against the played candidate (weighted by
its importance weight), mixed with the cross-entropy against a teacher's choice
distribution when ``sft.teacher`` is set. A packed batch's loss is the mean over its
decisions, so it equals the mean of the same decisions' unpacked losses.
With ``sft.reasoning: auxiliary`` the rows also hold each decision's rationale block; with
``before_answer`` each title block holds the rationale between the candidates and the answer. Either
way the loss adds the rationale's next-token cross-entropy (``mmart.train.reasoning``).

Run as: ``mmart sft --config configs/default.yaml`` (resumes from its last checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from trl import SFTTrainer

from mmart.config import PipelineConfig
from mmart.distributed import distributed_state
from mmart.examples import PromptEncoder
from mmart.artefacts import made_from
from mmart.model.chooser import slots_per_artwork
from mmart.model.scoring import score_batch
from mmart.train.common import (
    ProjectorLRMixin,
    across_ranks,
    common_args,
    freeze_projector_if_zero_lr,
    last_checkpoint,
    load_inputs,
    pin_mixed_precision,
    say_digest,
    trainer_config,
)
from mmart.train.resume import resume_launch, start_checkpoints, up_to_date
from mmart.train.trainers import check_trainer_extras, stage_trainer
from mmart.train.data import DecisionCollator, cache_rows, decision_rows, oracle_play, subsample
from mmart.rationale.record import rationale_table
from mmart.train.reasoning import load_rationales, rationale_loss, scores_and_rationale_ce
from mmart.train.init import build_model, ensure_init
from mmart.log import say
from mmart.train.finish import save_stage_model


def choice_loss(scores: torch.Tensor, batch: dict[str, torch.Tensor], teacher_weight: float = 0.0):
    """Mean over the batch's decisions of ``(1 - w) * weight * CE(played) + w * CE(teacher)``, and metrics.

    ``scores``: ``[B, D, K]`` (``-inf`` past a decision's K). A decision without a played label
    (``chosen`` -1) contributes only its teacher term. Returns ``(loss, metrics)``.
    """
    valid = batch["decision_mask"]
    s = scores[valid]  # [N, K]
    log_p = torch.log_softmax(s, dim=-1)
    real = torch.isfinite(s)
    chosen = batch["chosen"][valid]
    labelled = chosen >= 0
    weight = batch["weight"][valid] if "weight" in batch else torch.ones_like(chosen, dtype=s.dtype)
    ce = -log_p.gather(-1, chosen.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [N]
    hard = torch.where(labelled, weight * ce, torch.zeros_like(ce))
    metrics: dict[str, float] = {}
    if labelled.any():
        metrics["choice_accuracy"] = (s.argmax(-1) == chosen)[labelled].float().mean().item()
        metrics["played_ce"] = ce[labelled].mean().item()
    if "true_p" in batch:  # the demo world's truth (val): expected play of the greedy choice
        metrics["true_value"] = batch["true_p"][valid].gather(-1, s.argmax(-1, keepdim=True)).mean().item()
    if "target_probs" in batch:
        soft = -(batch["target_probs"][valid] * log_p.masked_fill(~real, 0.0)).sum(-1)  # [N]
        metrics["teacher_ce"] = soft.mean().item()
        metrics["teacher_agreement"] = (s.argmax(-1) == batch["target_probs"][valid].argmax(-1)).float().mean().item()
        per_decision = (1 - teacher_weight) * hard + teacher_weight * soft
    else:
        per_decision = hard
    return per_decision.mean(), metrics


def sft_loss(model, inputs: dict[str, torch.Tensor], readout=None, teacher_weight: float = 0.5,
             reasoning_weight: float = 0.0, accelerator=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """SFT's loss on a collated batch: ``choice_loss``, plus ``reasoning_weight`` times the rationale loss
    (``mmart.train.reasoning``) on rows built with rationale blocks. Returns ``(loss, scores, metrics)``."""
    reasoning = "rationale_labels" in inputs  # only rows built with rationales carry them
    if reasoning:
        scores, ce, has = scores_and_rationale_ce(model, inputs, readout)
    else:
        scores = score_batch(model, inputs, readout)  # [B, D, K]
    loss, metrics = choice_loss(scores, inputs, teacher_weight)
    loss = across_ranks(accelerator, loss, inputs["decision_mask"].sum())  # ranks hold unequal decisions
    if reasoning:
        rationale, metrics["rationale_ce"] = rationale_loss(ce, has)
        loss = loss + reasoning_weight * across_ranks(accelerator, rationale, has.sum())
    return loss, scores, metrics


class ArtworkSFTTrainer(ProjectorLRMixin, SFTTrainer):
    """SFTTrainer on packed decision rows; a separate projector learning rate; the listwise loss above."""

    teacher_weight: float = 0.5
    reasoning_weight: float = 0.0  # sft.reasoning: auxiliary, on rows with rationale blocks
    readout = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        loss, scores, metrics = sft_loss(model, inputs, self.readout, self.teacher_weight, self.reasoning_weight,
                                         self.accelerator)
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        self._metrics[mode]["decisions"].append(float(inputs["decision_mask"].sum()))
        return (loss, {"scores": scores}) if return_outputs else loss


def encoder_for(inputs, model, tokenizer) -> PromptEncoder:
    """The prompt encoder of a stage: slots per artwork come from the model (its cache x its projector)."""
    slots = slots_per_artwork(model) if inputs.cache is not None else 1
    return PromptEncoder(inputs.builder, tokenizer, slots)


def sft_examples(cfg: PipelineConfig, builder) -> list:
    """The decisions SFT learns from (``sft.examples``), drawn member by member up to ``sft.max_examples``
    (``sft.max_examples_fp32`` on a CPU's fp32 path)."""
    from mmart.train.common import examples_budget

    s = cfg.sft
    pool = builder.choice_examples("train") if s.examples == "played" else builder.pair_examples("train", labels=True)
    logged = subsample(pool, examples_budget(s, "sft"), s.seed, group=builder.prefix_key)
    return logged + builder.unlogged_examples(logged, s.unlogged_titles, s.seed)


def run_sft(cfg: PipelineConfig, out_dir: str | Path | None = None, callbacks: list | None = None,
            redo: bool = False) -> Path:
    """Train, save the chooser to ``<out>/model`` and the curves to ``<out>/model/curves.png``.

    Does nothing when ``<out>/model`` is up to date (``redo``: train from scratch anyway).
    """
    out = Path(out_dir or f"{cfg.output_dir}/sft")
    start = time.perf_counter()
    check_trainer_extras(cfg)  # the whole config, before anything (stage 0 included) is written
    # sft.reasoning: auxiliary refuses a missing or stale rationales table before anything is written
    rationales = load_rationales(cfg) if cfg.sft.reasoning != "none" else None
    made = made_from(cfg, "sft")
    if not redo and up_to_date("sft", out / "model", made):
        return out / "model"
    state = distributed_state()  # before the Trainer: CPU processes join one gloo group
    launch = resume_launch("sft", out, made, state, redo)
    inputs = load_inputs(cfg)
    init_dir = ensure_init(cfg, inputs)  # stage 0 once (main process), reused by every rank
    made = made_from(cfg, "sft")  # stage 0 may have run again: checkpoints of the old projector go
    start_checkpoints("sft", out, made, state, launch, redo)
    examples = sft_examples(cfg, inputs.builder)
    model, tokenizer = build_model(cfg, inputs.cache, inputs.contract, init_dir)
    teacher = None
    if cfg.sft.teacher != "none":
        from mmart.eval.teacher import fit_teacher

        teacher = fit_teacher(inputs.contract, kind=cfg.sft.teacher, split="train")
        say(f"[mmart sft] teacher: {cfg.sft.teacher} (fit on the train logs), weight {cfg.sft.teacher_weight}, "
              f"temperature {cfg.sft.teacher_temperature}")
    elif cfg.sft.examples == "pairs":
        say("[mmart sft] warning: sft.examples=pairs without a teacher learns only from the played pairs")
    encoder, rows_of = encoder_for(inputs, model, tokenizer), cache_rows(inputs.cache)
    data = decision_rows(encoder, examples, rows_of, cfg.sft.pack_titles, teacher, cfg.sft.teacher_temperature,
                         cfg.sft.propensity_clip, desc="encode sft", rationales=rationales, reasoning=cfg.sft.reasoning)
    if rationales is not None:
        said = sum(e.example_id in rationales for e in examples)
        say(f"[mmart sft] reasoning: {cfg.sft.reasoning}, weight {cfg.sft.reasoning_weight}: {said} of "
            f"{len(examples)} decisions with a rationale ({rationale_table(cfg)})")
        longer = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) >= cfg.sft.reasoning_max_tokens
                     for r in rationales.values())
        if longer:
            say(f"[mmart sft] warning: {longer} rationales are {cfg.sft.reasoning_max_tokens} tokens or longer "
                "(sft.reasoning_max_tokens): the model's own will be cut there, before their conclusion; raise it")
    val = None
    if cfg.sft.eval_examples:  # every logged val decision of some members, as SFT sees train ones
        pool = inputs.builder.pair_examples("val", labels=True)
        val = decision_rows(encoder, subsample(pool, cfg.sft.eval_examples, cfg.sft.seed, group=inputs.builder.prefix_key),
                            rows_of, cfg.sft.pack_titles, teacher, cfg.sft.teacher_temperature, cfg.sft.propensity_clip,
                            desc="encode val", true_play=oracle_play(cfg.data_dir),
                            # before_answer: val reads the answer after an empty rationale (no generation per eval)
                            **({"rationales": {}, "reasoning": "before_answer", "train_rationales": False}
                               if cfg.sft.reasoning == "before_answer" else {}))
    if freeze_projector_if_zero_lr(model, cfg.sft.projector_lr):
        say("[mmart sft] projector frozen (sft.projector_lr = 0): the slots keep their stage-0 word alignment")
    shared = common_args(cfg.sft, out, slots=cfg.prompt.artwork_input == "embeddings", what="sft",
                         evaluate=val is not None)
    pin_mixed_precision(shared["bf16"])
    config_cls, own = stage_trainer(cfg, "sft")
    args = trainer_config(config_cls, "sft", cfg.sft, shared, **own)
    trainer = ArtworkSFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=val, processing_class=tokenizer,
                                data_collator=DecisionCollator(pad_token_id=tokenizer.pad_token_id),
                                callbacks=callbacks)
    trainer.projector_lr = cfg.sft.projector_lr
    trainer.teacher_weight = cfg.sft.teacher_weight
    trainer.reasoning_weight = cfg.sft.reasoning_weight
    trainer.readout = inputs.builder.readout
    resume = last_checkpoint(out)
    if resume:
        say(f"[mmart sft] resuming from {resume}")
    say(f"[mmart sft] {len(examples)} decisions in {len(data)} rows (up to {cfg.sft.pack_titles} per member prefix), "
          f"{trainer.args.num_train_epochs} epoch(s), batch {cfg.sft.batch_size}x{cfg.sft.grad_accum} rows")
    trainer.train(resume_from_checkpoint=resume)
    if val is not None:
        trainer.evaluate()  # the final model on val, for the curves
    say_digest(trainer.model, "sft")
    return save_stage_model(trainer, tokenizer, cfg, "sft", out / "model", made,
                            ("loss", "choice_accuracy", "true_value", "teacher_ce", "rationale_ce", "learning_rate"),
                            len(examples), len(data), start, launch=launch)
