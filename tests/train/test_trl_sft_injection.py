"""TRL's SFTTrainer runs the chooser through its fused LM head: the artworks must reach its training loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from mmart.model.batching import pad_artwork_ids
from mmart.model.checkpoint import lora_config
from mmart.model.testing import letter_ids, tiny_chooser, tiny_prompt_ids

T = 2


@dataclass
class _ArtworkCollator(DataCollatorForLanguageModeling):
    """TRL's collator drops unknown columns; keep artwork_ids (the SFT module will own the real one)."""

    def torch_call(self, examples):
        output = super().torch_call(examples)
        output["artwork_ids"] = pad_artwork_ids([e["artwork_ids"] for e in examples])
        return output


def test_sft_training_loss_depends_on_the_artworks(tmp_path: Path) -> None:
    model, tokenizer = tiny_chooser("qwen2", tokens_per_artwork=T)
    letters = letter_ids(tokenizer, 4).tolist()
    rows = []
    for i, (k, history) in enumerate([(4, "Alien, horror."), (3, "Heat, crime."), (4, "The Crown, drama.")]):
        prompt = tiny_prompt_ids(tokenizer, k, T, history=history)
        rows.append({
            "input_ids": prompt + [letters[i % k]],
            "labels": [-100] * len(prompt) + [letters[i % k]],  # loss on the answer letter only
            "artwork_ids": list(range(i * 4, i * 4 + k)),
        })
    args = SFTConfig(
        output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none", use_cpu=True,
        per_device_train_batch_size=3, max_steps=1, remove_unused_columns=False, max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        data_collator=_ArtworkCollator(pad_token_id=tokenizer.pad_token_id), peft_config=lora_config(r=4, alpha=8),
    )
    trainer.model.train()
    batch = trainer.data_collator(rows)
    assert (batch["labels"] != -100).sum() == 3  # the answer letters only
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        swapped = trainer.compute_loss(trainer.model, dict(batch, artwork_ids=batch["artwork_ids"].flip(-1)))
    assert abs(float(loss) - float(swapped)) > 1e-4
    with pytest.raises(ValueError, match="no artwork_ids"):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "artwork_ids"})


def _per_candidate_trainer(tiny_world, tmp_path, teacher: bool = False, n: int = 4):
    from mmart.data.contract import load_contract
    from mmart.eval.reward_model import fit_reward_model
    from mmart.examples import ExampleBuilder, PromptConfig, PromptEncoder
    from mmart.model.chooser import set_artwork_cache
    from mmart.model.testing import tiny_artwork_cache
    from mmart.train.data import decision_rows
    from mmart.train.sft import ArtworkSFTTrainer, DecisionCollator

    contract = load_contract(tiny_world)
    builder = ExampleBuilder(contract, PromptConfig(answer="per_candidate", max_history=3))
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    ids = sorted(contract.frame("artworks").artwork_id)
    set_artwork_cache(model, tiny_artwork_cache(len(ids), T))
    examples = [e for e in builder.pair_examples("train", labels=True) if e.answer is not None][:n]
    data = decision_rows(PromptEncoder(builder, tokenizer, T), examples, lambda a: [ids.index(x) for x in a],
                         1, fit_reward_model(contract) if teacher else None)
    args = SFTConfig(
        output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none", use_cpu=True,
        per_device_train_batch_size=4, max_steps=1, remove_unused_columns=False, max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True}, learning_rate=1e-3, warmup_steps=0,
    )
    trainer = ArtworkSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                data_collator=DecisionCollator(pad_token_id=tokenizer.pad_token_id),
                                peft_config=lora_config(r=4, alpha=8, dropout=0.0))
    trainer.readout = builder.readout
    return trainer, data


def test_per_candidate_sft_loss_depends_on_the_artworks(tiny_world, tmp_path: Path) -> None:
    """The per-candidate listwise loss inside mmart's SFTTrainer subclass sees the artworks too."""
    trainer, data = _per_candidate_trainer(tiny_world, tmp_path)
    batch = trainer.data_collator(data.to_list())
    assert batch["score_positions"].shape == batch["answer_ids"].shape == (4, 1, batch["answer_ids"].shape[2])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        swapped = trainer.compute_loss(trainer.model, dict(batch, artwork_ids=batch["artwork_ids"].flip(-1)))
    assert abs(float(loss) - float(swapped)) > 1e-4
    before = float(loss)
    trainer.train()
    with torch.no_grad():
        after = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert after < before - 1e-3  # one step on these 4 examples lowers their listwise loss (no dropout: no noise)


def test_teacher_targets_mix_into_the_loss(tiny_world, tmp_path: Path) -> None:
    trainer, data = _per_candidate_trainer(tiny_world, tmp_path, teacher=True)
    rows = data.to_list()
    for r in rows:
        for probs, answers in zip(r["target_probs"], r["answer_ids"]):
            assert len(probs) == len(answers) and abs(sum(probs) - 1) < 1e-9 and min(probs) > 0
    batch = trainer.data_collator(rows)
    labelled = batch["chosen"] >= 0
    assert labelled.all()  # these examples all have a played label
    hard = {k: v for k, v in batch.items() if k != "target_probs"}
    one_hot = torch.nn.functional.one_hot(batch["chosen"].clamp(min=0), batch["answer_ids"].shape[2]).float()
    trainer.teacher_weight = 0.3
    with torch.no_grad():
        plain = float(trainer.compute_loss(trainer.model, dict(hard, weight=torch.ones_like(batch["weight"]))))
        same = float(trainer.compute_loss(trainer.model, dict(batch, target_probs=one_hot,
                                                              weight=torch.ones_like(batch["weight"]))))
        mixed = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert abs(plain - same) < 1e-5  # a one-hot teacher is the played label itself
    assert abs(plain - mixed) > 1e-4
