"""The shared-prompt DPO fast path equals TRL 1.16's DPOTrainer loss, and TRL's training loss sees the artworks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig

from mmart.model.checkpoint import lora_config
from mmart.model.chooser import PROJECTOR_ATTR
from mmart.model.testing import letter_ids, one_decision_row, tiny_chooser, tiny_prompt_ids
from mmart.train.data import DecisionCollator
from mmart.train.dpo_fast import (
    FastDPOConfig,
    MultimodalDPOTrainer,
    MultipleChoiceDPOTrainer,
    expand_to_pairs,
    fast_dpo_loss,
    multiple_choice_dpo_losses,
    select_negatives,
)

T = 2
BETA = 0.5


def _multiple_choice_examples(tokenizer) -> list[dict]:
    letters = letter_ids(tokenizer, 4).tolist()
    return [
        one_decision_row(tiny_prompt_ids(tokenizer, 4, T), [0, 1, 2, 3], letters, 2, [0, 1, 3], index=0),
        one_decision_row(tiny_prompt_ids(tokenizer, 3, T, history="Heat, crime."), [4, 5, 6], letters[:3], 0, [2],
                         index=1),
        one_decision_row(tiny_prompt_ids(tokenizer, 4, T, history="Recently played: The Crown (drama)."),
                         [7, 8, 9, 10], letters, 3, [0, 1], index=2),
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """TRL's trainer around a LoRA chooser whose adapter and projector copy are moved off the base."""
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    examples = _multiple_choice_examples(tokenizer)
    pairs = list(expand_to_pairs(examples))
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-dpo")), beta=BETA, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=len(pairs), max_steps=1, report_to="none", use_cpu=True,
        max_length=None, dataloader_num_workers=0,
    )
    trainer = MultimodalDPOTrainer(
        model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
        peft_config=lora_config(r=4, alpha=8, dropout=0.0),
    )
    torch.manual_seed(3)
    with torch.no_grad():  # after TRL wrapped it: policy != reference (= adapter disabled)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name or "modules_to_save.default" in name:
                param.add_(0.2 * torch.randn_like(param))
    trainer.model.train()
    return trainer, tokenizer, examples, pairs


def _trl_loss(trainer, pairs: list[dict]) -> torch.Tensor:
    batch = trainer.data_collator(pairs)
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch)


def test_fast_per_pair_losses_equal_trls(setup) -> None:
    trainer, tokenizer, examples, pairs = setup
    batch = DecisionCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        fast = fast_dpo_loss(trainer.model, batch, beta=BETA)
    fast_pairs = fast.pair_losses[fast.pair_mask]  # row-major = expand_to_pairs order
    assert fast_pairs.numel() == len(pairs) == 6
    trl_pairs = torch.stack([_trl_loss(trainer, [pair]) for pair in pairs])
    torch.testing.assert_close(fast_pairs, trl_pairs, rtol=0, atol=1e-5)
    assert (trl_pairs - torch.log(torch.tensor(2.0))).abs().max() > 1e-3  # not the trivial policy == reference
    torch.testing.assert_close(fast.loss, _trl_loss(trainer, pairs), rtol=0, atol=1e-5)


def test_robust_label_smoothing_equals_trls(setup) -> None:
    trainer, tokenizer, examples, pairs = setup
    batch = DecisionCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        fast = fast_dpo_loss(trainer.model, batch, beta=BETA, label_smoothing=0.1, loss_type="robust")
    trainer.loss_types, trainer.label_smoothing = ["robust"], 0.1
    try:
        trl_loss = _trl_loss(trainer, pairs)
    finally:
        trainer.loss_types, trainer.label_smoothing = ["sigmoid"], 0.0
    torch.testing.assert_close(fast.loss, trl_loss, rtol=0, atol=1e-5)


def test_trls_training_loss_changes_when_the_artworks_change(setup) -> None:
    """Fails if TRL's fused training forward silently drops artwork_ids (NOTES.md)."""
    trainer, tokenizer, examples, pairs = setup
    batch = trainer.data_collator(pairs)
    assert batch["artwork_ids"].shape[0] == batch["input_ids"].shape[0] == 2 * len(pairs)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        swapped = dict(batch, artwork_ids=batch["artwork_ids"].flip(-1).sort(dim=-1, descending=True).values)
        swapped_loss = trainer.compute_loss(trainer.model, swapped)
    assert abs(float(loss) - float(swapped_loss)) > 1e-4
    batch.pop("artwork_ids")
    with pytest.raises(ValueError, match="no artwork_ids"):
        trainer.compute_loss(trainer.model, batch)


def test_fast_loss_trains_lora_and_the_projector_copy_only(setup) -> None:
    trainer, tokenizer, examples, _ = setup
    trainer.model.zero_grad()
    batch = DecisionCollator(tokenizer.pad_token_id)(examples)
    fast_dpo_loss(trainer.model, batch, beta=BETA).loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads)
    assert any(f"{PROJECTOR_ATTR}.modules_to_save.default" in n for n in grads)
    assert not any(f"{PROJECTOR_ATTR}.original_module" in n for n in grads)
    trainer.model.zero_grad()


def test_the_reference_forward_leaves_a_frozen_projector_frozen(setup) -> None:
    """dpo.projector_lr 0 freezes the projector copy; PEFT's re-enabling of the adapter after the reference
    forward made it trainable again, with gradients DDP never synchronised (ranks diverged once clipped)."""
    trainer, tokenizer, examples, _ = setup
    copy = [p for n, p in trainer.model.named_parameters() if f"{PROJECTOR_ATTR}.modules_to_save.default" in n]
    assert copy and all(p.requires_grad for p in copy)
    try:
        for p in copy:
            p.requires_grad_(False)
        trainer.model.zero_grad()
        batch = DecisionCollator(tokenizer.pad_token_id)(examples)
        fast_dpo_loss(trainer.model, batch, beta=BETA).loss.backward()
        assert not any(p.requires_grad or p.grad is not None for p in copy)
        assert any(p.grad is not None for n, p in trainer.model.named_parameters() if "lora_A" in n)
    finally:
        for p in copy:
            p.requires_grad_(True)
        trainer.model.zero_grad()


def test_trls_reference_forward_leaves_a_frozen_projector_frozen(setup) -> None:
    """The same on dpo.method: trl, whose reference forward is TRL's own (the divergence stop 21 fixed on the fast path)."""
    trainer, _, _, pairs = setup
    copy = [p for n, p in trainer.model.named_parameters() if f"{PROJECTOR_ATTR}.modules_to_save.default" in n]
    try:
        for p in copy:
            p.requires_grad_(False)
        batch = trainer.data_collator(pairs)
        trainer.compute_loss(trainer.model, batch)
        assert copy and not any(p.requires_grad for p in copy)
    finally:
        for p in copy:
            p.requires_grad_(True)


def test_loss_formula_and_padding() -> None:
    policy = torch.tensor([[-1.0, -2.0, float("-inf")]])
    ref = torch.tensor([[-1.5, -1.0, float("-inf")]])
    rejected = torch.tensor([[False, True, True]])
    rejected_valid = rejected & torch.isfinite(policy)
    losses, rewards = multiple_choice_dpo_losses(policy, ref, torch.tensor([0]), rejected_valid, beta=1.0)
    expected = -torch.nn.functional.logsigmoid(torch.tensor((-1.0 + 1.5) - (-2.0 + 1.0)))
    torch.testing.assert_close(losses[0, 1], expected)
    assert losses[0, 2] == 0 and torch.isfinite(losses).all() and torch.isfinite(rewards).all()


def test_multiple_choice_trainer_runs_and_logs_dpo_metrics(tmp_path: Path) -> None:
    model, tokenizer = tiny_chooser("llama", tokens_per_artwork=T)
    from mmart.model.checkpoint import add_lora

    model = add_lora(model, lora_config(r=4, alpha=8, dropout=0.0))
    examples = _multiple_choice_examples(tokenizer)
    args = FastDPOConfig(
        output_dir=str(tmp_path), beta=BETA, per_device_train_batch_size=3, max_steps=3, learning_rate=5e-3,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", dataloader_num_workers=0,
    )
    trainer = MultipleChoiceDPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(examples), eval_dataset=Dataset.from_list(examples),
        data_collator=DecisionCollator(tokenizer.pad_token_id),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and {"rewards/margins", "rewards/accuracies"} <= set(logs[-1])
    assert logs[-1]["loss"] < logs[0]["loss"]
    evaluation = trainer.evaluate()
    assert evaluation["eval_loss"] < logs[0]["loss"] and "eval_rewards/margins" in evaluation


def test_generate_still_takes_artwork_ids_after_trl_patched_the_model(setup) -> None:
    trainer, tokenizer, examples, _ = setup
    ids, artworks = torch.tensor([examples[0]["input_ids"]]), torch.tensor([examples[0]["artwork_ids"]])
    with torch.no_grad():
        out = trainer.model.generate(input_ids=ids, artwork_ids=artworks, max_new_tokens=2, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 2)


def test_fast_rewards_equal_trls_logged_rewards(setup) -> None:
    """The logged rewards/chosen and rewards/margins are TRL's (the chosen reward is not a masked 0)."""
    trainer, tokenizer, examples, pairs = setup
    batch = DecisionCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        fast = fast_dpo_loss(trainer.model, batch, beta=BETA)
    per_pair_chosen = fast.chosen_rewards.unsqueeze(-1).expand_as(fast.pair_mask)[fast.pair_mask]
    margins = (fast.chosen_rewards.unsqueeze(-1) - fast.rejected_rewards)[fast.pair_mask]
    assert per_pair_chosen.abs().min() > 0
    trainer._metrics["train"].clear()
    _trl_loss(trainer, pairs)
    logged = trainer._metrics["train"]
    assert abs(per_pair_chosen.mean().item() - logged["rewards/chosen"][-1]) < 1e-5
    assert abs(margins.mean().item() - logged["rewards/margins"][-1]) < 1e-5


def test_negatives_are_picked_by_the_references_order() -> None:
    ref = torch.tensor([[-1.0, -0.5, -3.0, -0.9], [-0.2, -2.0, -1.0, float("-inf")]])
    chosen = torch.tensor([0, 0])
    rejected = torch.tensor([[False, True, True, True], [False, True, True, False]])
    assert select_negatives(rejected, ref, chosen, "all").equal(rejected)
    # row 0: the reference puts candidates 1 and 3 above the chosen 0; row 1 already orders the chosen first
    assert select_negatives(rejected, ref, chosen, "misordered").tolist() == [[False, True, False, True], [False] * 4]
    assert select_negatives(rejected, ref, chosen, "hardest").tolist() == [
        [False, True, False, False], [False, False, True, False]]
    with pytest.raises(ValueError, match="negatives must be one of"):
        select_negatives(rejected, ref, chosen, "easy")


def test_misordered_negatives_keep_only_what_the_reference_misorders(setup) -> None:
    """The kept pairs' losses are the full loss's on those pairs; a batch whose every decision the reference
    already orders gives a zero loss whose backward still runs (a rank with no pair keeps DDP in step)."""
    trainer, tokenizer, examples, _ = setup
    batch = DecisionCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        every = fast_dpo_loss(trainer.model, batch, beta=BETA)
        mis = fast_dpo_loss(trainer.model, batch, beta=BETA, negatives="misordered")
    ref_chosen = every.ref_logps.gather(-1, batch["chosen"][:, :1])
    assert mis.pair_mask.equal(every.pair_mask & (every.ref_logps >= ref_chosen))
    assert 0 < mis.pair_mask.sum() < every.pair_mask.sum()
    torch.testing.assert_close(mis.pair_losses[mis.pair_mask], every.pair_losses[mis.pair_mask])

    ordered = dict(batch)  # each decision's chosen letter = the reference's top, every other real letter rejected
    top = every.ref_logps.argmax(-1)
    ordered["chosen"] = top.view(-1, 1)
    letters = torch.arange(every.ref_logps.shape[-1])
    ordered["rejected_mask"] = ((letters != top.view(-1, 1)) & torch.isfinite(every.ref_logps)).unsqueeze(1)
    trainer.model.zero_grad()
    out = fast_dpo_loss(trainer.model, ordered, beta=BETA, negatives="misordered")
    assert out.loss.item() == 0 and not out.pair_mask.any()
    out.loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)
    trainer.model.zero_grad()
