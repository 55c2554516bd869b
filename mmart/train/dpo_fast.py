"""DPO for multiple-choice answers: one shared forward scores every candidate letter.

Shape letters: B rows, L row length, M artworks per row, D decisions per row, K candidates,
N decisions in a batch.

When the answer is a single letter token, TRL's DPO on a (chosen, rejected) pair reduces
to the log-probabilities of two letters at the same answer position of the same prompt.
TRL still runs 4 sequence forwards per pair (policy and reference, chosen and rejected):
4(K-1) per prompt with K-1 rejected candidates. Here one policy forward (with backward)
and one reference forward per *prompt* give all K letters' log-probabilities
(``score_batch``), and the sigmoid DPO loss is taken over the chosen letter against
each rejected one. The per-pair losses are TRL's to within float error
(tests/train/test_dpo_fast.py), provided TRL's completion is the letter token alone.

The same loss applies to any readout (``mmart.model.readout``): ``per_candidate`` reads each
candidate's log-probability at its own position instead of at the answer position (there is
no TRL equivalent of that form). Rows may pack several decisions of one member behind one
prefix (``mmart.model.packing``); the loss is then the mean over every pair of every decision
in the batch, the same as over the decisions' unpacked rows.

Also here: ``MultimodalDPOTrainer``, TRL's own ``DPOTrainer`` made to accept the chooser's
pre-tokenized, artwork-carrying pairs, so TRL's loss variants stay available and the
fast path can be checked against the real thing.

Example formats (pre-tokenized):

* decision rows (fast path): ``mmart.train.data.decision_rows``, with per-decision ``chosen``
  (index into the K candidates) and ``rejected`` (indices paired against it).
* pairs (TRL): ``prompt_ids``, ``chosen_ids: [letter]``, ``rejected_ids: [letter]``,
  ``artwork_ids``; ``expand_to_pairs`` makes them from one-decision letter rows.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from mmart.model.batching import pad_artwork_ids
from mmart.model.scoring import score_batch
from mmart.train.common import across_ranks

FAST_LOSS_TYPES = ("sigmoid", "robust")
NEGATIVES = ("all", "hardest", "misordered")


def select_negatives(rejected_mask: torch.Tensor, ref_logps: torch.Tensor, chosen: torch.Tensor,
                     negatives: str) -> torch.Tensor:
    """Which of each decision's rejected letters ``[N, K]`` to pair against its chosen one, by the reference's scores.

    At the start of DPO the policy is the reference, so every pair's margin is 0 and every pair pulls
    equally, including those the reference already orders right. ``hardest`` keeps each decision's
    strongest competitor (one pair per decision); ``misordered`` keeps only the rejected letters the
    reference scores at or above the chosen one, so a decision whose argmax is already right adds nothing.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if negatives == "all":
        return rejected_mask
    ref = ref_logps.detach()
    if negatives == "misordered":
        return rejected_mask & (ref >= ref.gather(-1, chosen.view(-1, 1)))
    scores = ref.masked_fill(~rejected_mask, float("-inf"))
    hardest = torch.zeros_like(rejected_mask).scatter(-1, scores.argmax(-1, keepdim=True), True)
    return hardest & rejected_mask


def multiple_choice_dpo_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses ``[B, K]`` (0 off the pairs) and the implicit rewards ``[B, K]``.

    Args:
        policy_logps, ref_logps: ``[B, K]`` letter log-probabilities under policy and reference.
        chosen: ``[B]`` index of the chosen letter.
        rejected_mask: ``[B, K]`` bool, True for the letters paired against the chosen one.
        beta: DPO temperature, as TRL's ``beta``.
        label_smoothing: ``sigmoid``: conservative DPO, ``-(1-e) logsig(b d) - e logsig(-b d)``
            (TRL 1.16's ``sigmoid`` has no smoothing, so it equals TRL only at 0);
            ``robust``: TRL's robust DPO, ``(-(1-e) logsig(b d) + e logsig(-b d)) / (1-2e)``.

    Rewards are ``beta * (policy - ref)``; a pair's margin is ``reward[chosen] - reward[k]``.
    """
    if loss_type not in FAST_LOSS_TYPES:
        raise ValueError(f"the fast DPO path supports loss types {FAST_LOSS_TYPES}, got {loss_type!r}")
    raw = policy_logps - ref_logps  # [B, K]; NaN where a padded letter has -inf in both
    chosen_logratios = raw.gather(-1, chosen.view(-1, 1))  # [B, 1]
    # Padded letters have -inf log-probs; keep them out of the arithmetic, not just the mean.
    logratios = torch.where(rejected_mask, raw, torch.zeros_like(raw))
    delta = beta * (chosen_logratios - logratios)  # [B, K]
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
    else:
        losses = (-(1 - eps) * F.logsigmoid(delta) + eps * F.logsigmoid(-delta)) / (1 - 2 * eps)
    losses = torch.where(rejected_mask, losses, torch.zeros_like(losses))
    rewards = torch.where(torch.isfinite(policy_logps) & torch.isfinite(ref_logps), raw, torch.zeros_like(raw))
    return losses, beta * rewards.detach()  # every real candidate's reward, the chosen one included


@dataclass
class FastDPOOutput:
    """Loss (mean over all pairs in the batch, as TRL averages over its pair-examples) and details."""

    loss: torch.Tensor
    pair_losses: torch.Tensor  # [B, K], 0 off the pairs
    pair_mask: torch.Tensor  # [B, K]
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B, K], 0 off the pairs
    policy_logps: torch.Tensor  # [B, K]
    ref_logps: torch.Tensor  # [B, K]


@contextlib.contextmanager
def keep_trainable_flags(model: nn.Module) -> Iterator[None]:
    """Leave every parameter of ``model`` as trainable or frozen as it was on entry.

    TRL's ``use_adapter`` (the reference forward of a PEFT policy) re-enables the adapter on exit,
    and PEFT then marks its ``modules_to_save`` copy trainable again: a projector that
    ``dpo.projector_lr: 0`` froze after DDP had listed what to synchronise would take rank-local
    gradients into the clipping norm, and ranks diverged on the first clipped step.
    """
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, trainable in flags:
            if p.requires_grad != trainable:
                p.requires_grad_(trainable)


@contextlib.contextmanager
def reference_context(model: nn.Module) -> Iterator[None]:
    """What makes a PEFT model its own reference, as TRL's DPOTrainer does.

    A frozen copy of the adapter named ``ref`` if there is one (TRL adds it when handed an
    already-trained PEFT model), else all adapters disabled, which also switches the
    projector back to its base copy (``modules_to_save``).

    Leaves every parameter as trainable or frozen as it found it (``keep_trainable_flags``).
    """
    from trl.trainer.utils import use_adapter

    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if not hasattr(model, "peft_config"):
        raise TypeError("without a ref_model, the policy must be a PEFT model (the reference = adapter disabled)")
    with keep_trainable_flags(model), use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
        yield


def fast_dpo_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    ref_model: nn.Module | None = None,
    readout=None,
    negatives: str = "all",
) -> FastDPOOutput:
    """One policy forward (with grad) and one reference forward (no grad) over the batch's rows.

    ``batch``: a collated batch of decision rows (``mmart.model.packing.collate_rows``) with
    ``chosen`` ``[B, D]`` and ``rejected_mask`` ``[B, D, K]``. Decisions without a label are skipped.
    The reference is ``ref_model`` or, for a PEFT policy, the policy with its adapter off.
    ``negatives`` (``select_negatives``) may leave a batch without a pair: its loss is then a zero that
    still reaches every trainable weight, so ranks stay in step.
    """
    policy = score_batch(model, batch, readout)
    with torch.no_grad():
        if ref_model is not None:
            ref = score_batch(ref_model, batch, readout)
        else:
            with reference_context(model):
                ref = score_batch(model, batch, readout)
    valid = batch["decision_mask"] & (batch["chosen"] >= 0)  # [B, D]
    policy_logps, ref_logps, chosen = policy[valid], ref[valid], batch["chosen"][valid]  # [N, K], [N]
    rejected_mask = batch["rejected_mask"][valid] & (batch["answer_ids"][valid] >= 0)
    if int(rejected_mask.sum()) == 0:
        raise ValueError("the batch has no (chosen, rejected) pair: every example needs at least one rejected letter")
    rejected_mask = select_negatives(rejected_mask, ref_logps, chosen, negatives)
    losses, rewards = multiple_choice_dpo_losses(
        policy_logps, ref_logps, chosen, rejected_mask, beta, label_smoothing, loss_type
    )
    num_pairs = rejected_mask.sum()
    if int(num_pairs) == 0:  # every decision here already ordered right (negatives: misordered)
        zero = torch.where(torch.isfinite(policy_logps), policy_logps, torch.zeros_like(policy_logps)).sum() * 0.0
        losses, num_pairs = losses + zero, torch.ones_like(num_pairs)
    chosen_rewards = rewards.gather(-1, chosen.view(-1, 1)).squeeze(-1)
    return FastDPOOutput(
        loss=losses.sum() / num_pairs,
        pair_losses=losses,
        pair_mask=rejected_mask,
        chosen_rewards=chosen_rewards,
        rejected_rewards=torch.where(rejected_mask, rewards, torch.zeros_like(rewards)),
        policy_logps=policy_logps,
        ref_logps=ref_logps,
    )


def expand_to_pairs(rows: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """TRL preference rows from one-decision letter rows: one per (chosen, rejected letter).

    Completions are the single letter token and nothing else (no EOS): that is what the
    fast path scores, and the condition for its losses to equal TRL's. The row must end at
    its answer position (a letter readout), so the completion follows the prompt directly.
    """
    for e in rows:
        if len(e["answer_ids"]) != 1:
            raise ValueError("TRL's DPOTrainer takes one prompt per pair: build the rows with pack_titles=1")
        positions, answers, chosen = e["score_positions"][0], e["answer_ids"][0], e["chosen"][0]
        if len(set(positions)) != 1 or positions[0] != len(e["input_ids"]) - 1:
            raise ValueError("TRL's DPOTrainer scores completions, not per-candidate positions: "
                             "dpo.method=trl needs prompt.answer=letter (or use dpo.method=fast)")
        for r in e["rejected"][0]:
            yield {
                "prompt_ids": list(e["input_ids"]),
                "chosen_ids": [answers[chosen]],
                "rejected_ids": [answers[r]],
                "artwork_ids": list(e.get("artwork_ids", [])),
            }


@dataclass
class FastDPOConfig(TrainingArguments):
    """Training arguments of the fast path; the DPO knobs mirror TRL's ``DPOConfig``."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature; higher keeps the policy closer to the reference."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative/robust DPO label noise (0 = plain DPO)."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {FAST_LOSS_TYPES}."})
    negatives: str = field(default="all", metadata={"help": f"One of {NEGATIVES}: mmart.train.dpo_fast.select_negatives."})
    # The batch keys (answer_ids, chosen, ...) are not forward() arguments; keep them.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the loss needs every key."})


class MultipleChoiceDPOTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is ``fast_dpo_loss``; checkpoints, resume and logging come with it.

    Logs TRL's DPO metric names (``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``) so the same plots read both trainers.
    """

    readout = None

    def __init__(self, *args: Any, ref_model: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("MultipleChoiceDPOTrainer needs remove_unused_columns=False (FastDPOConfig's default)")
        self.ref_model = ref_model
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        out = fast_dpo_loss(
            model,
            inputs,
            beta=getattr(self.args, "beta", 0.1),
            label_smoothing=getattr(self.args, "label_smoothing", 0.0),
            loss_type=getattr(self.args, "loss_type", "sigmoid"),
            ref_model=self.ref_model,
            readout=self.readout,
            negatives=getattr(self.args, "negatives", "all"),
        )
        loss = across_ranks(self.accelerator, out.loss, out.pair_mask.sum())  # ranks hold unequal pairs
        metrics = self._metrics["train" if model.training else "eval"]
        mask = out.pair_mask
        margins = (out.chosen_rewards.unsqueeze(-1) - out.rejected_rewards)[mask]
        metrics["rewards/chosen"].append(out.chosen_rewards.mean().item())
        metrics["pairs"].append(float(mask.sum()))
        if mask.any():  # negatives: misordered can leave a batch without a pair
            metrics["rewards/rejected"].append(out.rejected_rewards[mask].mean().item())
            metrics["rewards/margins"].append(margins.mean().item())
            metrics["rewards/accuracies"].append((margins > 0).float().mean().item())
        if "true_p" in inputs:  # val on the demo world: the policy's greedy choice, valued by the truth
            valid = inputs["decision_mask"] & (inputs["chosen"] >= 0)
            choice = out.policy_logps.argmax(-1, keepdim=True)
            metrics["true_value"].append(inputs["true_p"][valid].gather(-1, choice).mean().item())
            metrics["choice_accuracy"].append((choice.squeeze(-1) == inputs["chosen"][valid]).float().mean().item())
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[override]
        """Evaluation computes the DPO loss; the batch has no ``labels`` for Trainer's default path."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        metrics = self._metrics[mode]
        logs.update({prefix + key: sum(values) / len(values) for key, values in metrics.items() if values})
        metrics.clear()
        super().log(logs, start_time)


@dataclass
class MultimodalPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus ``artwork_ids``, duplicated for the [chosen; rejected] halves.

    TRL lays a batch of B pairs out as 2B sequences (all chosen, then all rejected) and
    passes every extra key to the model, so per-example tensors must have 2B rows.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        artwork_ids = pad_artwork_ids([e.get("artwork_ids", []) for e in examples])
        output["artwork_ids"] = torch.cat([artwork_ids, artwork_ids], dim=0)
        return output


class MultimodalDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` on the chooser's pre-tokenized pairs with ``artwork_ids``.

    * The dataset is already tokenized (``prompt_ids``/``chosen_ids``/``rejected_ids``):
      ``_prepare_dataset`` would try to extract and re-tokenize a text prompt, so it is
      skipped for such datasets.
    * ``artwork_ids`` must survive ``remove_unused_columns`` and be padded and duplicated
      by the collator (``MultimodalPreferenceCollator``).
    * ``max_length`` truncation that cuts slots raises in the chooser (slots != artworks).
    * Without a PEFT policy, pass ``ref_model`` (a chooser too): TRL would otherwise reload
      the reference from the config's path, a plain LLM without the projector.
    """

    def __init__(
        self, model, *, args=None, data_collator=None, processing_class=None, **kwargs: Any
    ) -> None:
        if data_collator is None and processing_class is not None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            data_collator = MultimodalPreferenceCollator(
                pad_token_id=pad_id,
                max_length=getattr(args, "max_length", None),
                truncation_mode=getattr(args, "truncation_mode", "keep_start"),
                pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None),
            )
        super().__init__(model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # type: ignore[override]
        first = next(iter(dataset))
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(first):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        """TRL's loss; its reference forward (``use_adapter``) must not unfreeze a frozen projector copy."""
        with keep_trainable_flags(self.model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):  # type: ignore[override]
        with keep_trainable_flags(self.model):
            return super().compute_ref_log_probs(model, inputs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "artwork_ids" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "artwork_ids"]
