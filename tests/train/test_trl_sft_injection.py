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
from mmart.model.scoring import letter_token_ids
from mmart.model.testing import tiny_chooser, tiny_prompt_ids

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
    letters = letter_token_ids(tokenizer, 4).tolist()
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
