"""DPO after SFT: chosen = the played artwork, rejected = shown-and-not-played (else the others).

Run as: ``mmart dpo --config configs/default.yaml`` (resumes from its last checkpoint).

The SFT chooser is exported merged (``<out>/sft/merged``) and becomes DPO's base: a
fresh LoRA adapter trains on top, and the reference model is that adapter disabled, i.e.
exactly the SFT model. ``dpo.method: fast`` (the default, for single-letter answers) scores
every candidate letter with one policy and one reference forward over the shared prompt;
``dpo.method: trl`` runs TRL's ``DPOTrainer`` on (chosen, rejected) pairs, so every TRL loss
variant stays available. The two give the same sigmoid loss (tests/train/test_dpo_fast.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from datasets import Dataset

from mmart.artefacts import made_from, model_fingerprint, stale, write_record
from mmart.config import PipelineConfig
from mmart.distributed import distributed_state
from mmart.errors import UserError
from mmart.model.checkpoint import add_lora, export_merged, load_chooser, lora_config, read_spec
from mmart.model.chooser import set_artwork_cache
from mmart.train.common import (
    ProjectorLRMixin,
    common_args,
    device,
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
from mmart.train.dpo_fast import (
    MultimodalDPOTrainer,
    MultipleChoiceDPOTrainer,
    expand_to_pairs,
)
from mmart.log import say
from mmart.train.finish import save_stage_model
from mmart.train.sft import encoder_for


class FastTrainer(ProjectorLRMixin, MultipleChoiceDPOTrainer):
    pass


class TRLTrainer(ProjectorLRMixin, MultimodalDPOTrainer):
    pass


def merged_sft(sft_model_dir: Path) -> Path:
    """The SFT chooser as a standalone merged folder: DPO's base and reference.

    Made once per SFT model: its record names the SFT weights it was merged from, and a
    retrained SFT model is merged again (never a merge of older weights).
    """
    import shutil

    merged = sft_model_dir.parent / "merged"
    wanted = {"stage": "merge", "inputs": {"sft": model_fingerprint(sft_model_dir)}}
    why = stale(merged, wanted)
    if why:
        say(f"[mmart dpo] merging the SFT adapter into {merged} ({'; '.join(why)})")
        tmp = merged.with_name(f".merged-tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        export_merged(sft_model_dir, tmp)
        write_record(tmp, wanted)
        shutil.rmtree(merged, ignore_errors=True)
        tmp.rename(merged)
    return merged


def teacher_pairs(examples: list, teacher, margin: float) -> list:
    """Each decision's teacher-top candidate as chosen, and as rejected every candidate whose logit P(play) is at
    least ``margin`` below it (and strictly below: margin 0 pairs it against every lower candidate, never
    against itself or a tie); decisions with nothing that far below are dropped."""
    import numpy as np

    out = []
    for ex in examples:
        q = np.clip(teacher.predict([ex.user_id] * len(ex.candidates), ex.candidates), 1e-6, 1 - 1e-6)
        z = np.log(q) - np.log1p(-q)
        top = int(z.argmax())
        rejected = [k for k in range(len(z)) if z[top] - z[k] >= margin and z[k] < z[top]]
        if rejected:
            ex.answer, ex.rejected = top, rejected
            out.append(ex)
    return out


def dpo_examples(cfg: PipelineConfig, inputs) -> list:
    """DPO's decisions (``dpo.pairs``), drawn member by member (``dpo.seed``) up to ``dpo.max_examples`` (or
    ``dpo.max_examples_fp32``), from
    the members SFT did not train on (all members when those are too few)."""
    from mmart.train.common import examples_budget
    from mmart.train.sft import sft_examples

    d, b = cfg.dpo, inputs.builder
    budget = examples_budget(d, "dpo")
    seen = {b.prefix_key(ex) for ex in sft_examples(cfg, b)}

    def unseen(pool: list) -> list:
        rest = [ex for ex in pool if b.prefix_key(ex) not in seen]
        return rest if len(rest) >= budget > 0 else pool

    if d.pairs == "logged":
        return subsample(unseen(b.preference_examples("train")), budget, d.seed, group=b.prefix_key)
    from mmart.eval.teacher import fit_teacher

    teacher = fit_teacher(inputs.contract, kind=d.teacher, split="train")
    pool = unseen(b.pair_examples("train", labels=True))
    kept = teacher_pairs(pool, teacher, d.teacher_margin)
    say(f"[mmart dpo] teacher pairs ({d.teacher}, margin {d.teacher_margin}): {len(kept)} of {len(pool)} decisions "
          "have a candidate that far below the top")
    return subsample(kept, budget, d.seed, group=b.prefix_key)


def own_rationales(cfg: PipelineConfig, model, encoder, examples: list, rows_of) -> dict:
    """Under ``sft.reasoning: before_answer``, the ``decision_rows`` arguments that read every DPO decision's
    answers after the SFT model's own rationale, as predict will: chosen and rejected share it, so its
    log-probability cancels in the DPO margin and DPO trains the answer given the model's reasoning. Empty
    otherwise. Each process writes its share (every n-th decision), and all gather the whole list."""
    if cfg.sft.reasoning != "before_answer":
        return {}
    from mmart.model.explain import write_rationales
    from mmart.train.common import use_bf16
    from mmart.train.data import encode_decisions

    state = distributed_state()
    mine = examples[state.process_index::state.num_processes]
    texts = write_rationales(model, encoder, encode_decisions(encoder, mine, "encode dpo"), "before_answer",
                             cfg.sft.reasoning_max_tokens, rows_of, bf16=use_bf16(cfg.dpo.bf16, "dpo"),
                             progress=state.is_main_process)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        shares = gather_object([texts])  # one list per process, in rank order
        texts = [""] * len(examples)
        for rank, share in enumerate(shares):
            texts[rank::state.num_processes] = share
    say(f"[mmart dpo] reasoning: before_answer: the SFT model wrote a rationale before each of {len(texts)} "
        "decisions' answers")
    return {"rationales": texts, "reasoning": "before_answer", "train_rationales": False}


def run_dpo(cfg: PipelineConfig, sft_model_dir: str | Path | None = None, out_dir: str | Path | None = None,
            redo: bool = False) -> Path:
    """Train DPO on the SFT model and save ``<out>/model``; nothing when it is up to date (``redo``: anyway)."""
    out = Path(out_dir or f"{cfg.output_dir}/dpo")
    sft_dir = Path(sft_model_dir or f"{cfg.output_dir}/sft/model")
    if cfg.dpo.method == "trl" and cfg.prompt.answer != "letter":
        raise UserError("dpo.method=trl scores completions with TRL's DPOTrainer, which needs prompt.answer=letter; "
                        "per_candidate answers train with dpo.method=fast")
    if cfg.dpo.method == "trl" and cfg.sft.reasoning == "before_answer":
        raise UserError("sft.reasoning=before_answer trains DPO with dpo.method=fast (the answers read after the "
                        "SFT model's own rationale); dpo.method=trl builds its completions without one")
    check_trainer_extras(cfg)  # the whole config, before anything (the merged SFT model included) is written
    read_spec(sft_dir)  # a clear error when SFT has not run
    made = made_from(cfg, "dpo", model_dir=sft_dir)
    if not redo and up_to_date("dpo", out / "model", made):
        return out / "model"
    start = time.perf_counter()
    state = distributed_state()
    launch = resume_launch("dpo", out, made, state, redo)
    with state.main_process_first():  # one process merges; the others then read it
        base = merged_sft(sft_dir).resolve() if state.is_main_process else (sft_dir.parent / "merged").resolve()
    start_checkpoints("dpo", out, made, state, launch, redo)
    inputs = load_inputs(cfg)
    model, tokenizer, _ = load_chooser(base, dtype=cfg.model.dtype, device=device())
    if inputs.cache is not None:
        set_artwork_cache(model, inputs.cache.embeddings)
    d = cfg.dpo
    examples = dpo_examples(cfg, inputs)
    encoder, rows_of = encoder_for(inputs, model, tokenizer), cache_rows(inputs.cache)
    reasoned = own_rationales(cfg, model, encoder, examples, rows_of)  # before the adapter: the SFT model's
    torch.manual_seed(cfg.model.seed)
    m = cfg.model
    model = add_lora(model, lora_config(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target))
    pack = d.pack_titles if d.method == "fast" else 1
    rows = decision_rows(encoder, examples, rows_of, pack, desc="encode dpo", **reasoned)
    val = None
    if d.eval_examples and d.method == "fast":  # held-out logged preferences (the val split)
        pool = subsample(inputs.builder.preference_examples("val"), d.eval_examples, d.seed,
                         group=inputs.builder.prefix_key)
        val = decision_rows(encoder, pool, rows_of, pack, desc="encode val", true_play=oracle_play(cfg.data_dir),
                            # before_answer: val reads the answers after an empty rationale (no generation per eval)
                            **({"rationales": {}, "reasoning": "before_answer", "train_rationales": False}
                               if reasoned else {}))
    if freeze_projector_if_zero_lr(model, d.projector_lr):
        say("[mmart dpo] projector frozen (dpo.projector_lr = 0)")
    shared = common_args(d, out, slots=cfg.prompt.artwork_input == "embeddings", what="dpo", evaluate=val is not None)
    pin_mixed_precision(shared["bf16"])
    config_cls, own = stage_trainer(cfg, "dpo")
    args = trainer_config(config_cls, "dpo", d, shared, **own)
    if d.method == "fast":
        trainer = FastTrainer(model=model, args=args, train_dataset=rows, eval_dataset=val,
                              data_collator=DecisionCollator(pad_token_id=tokenizer.pad_token_id))
        trainer.readout = inputs.builder.readout
    else:
        pairs = Dataset.from_list(list(expand_to_pairs(rows.to_list())))
        trainer = TRLTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.projector_lr = d.projector_lr
    resume = last_checkpoint(out)
    if resume:
        say(f"[mmart dpo] resuming from {resume}")
    say(f"[mmart dpo] {len(examples)} preference examples in {len(rows)} rows ({d.method} path), beta {d.beta}"
        + (f", negatives: {d.negatives}" if d.negatives != "all" else ""))
    trainer.train(resume_from_checkpoint=resume)
    if val is not None:
        trainer.evaluate()  # the final model on val, for the curves
    say_digest(trainer.model, "dpo")
    # The DPO adapter stacked on the SFT one, on the SFT model's own base: the folder stands alone.
    return save_stage_model(trainer, tokenizer, cfg, "dpo", out / "model", made,
                            ("loss", "rewards/margins", "rewards/accuracies", "true_value", "learning_rate"),
                            len(examples), len(rows), start, stacked_on=sft_dir, launch=launch)
