"""Training on packed decisions: a packed batch's loss equals the mean of the same decisions' unpacked losses."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mmart.data.contract import load_contract
from mmart.eval.reward_model import fit_reward_model
from mmart.examples import ExampleBuilder, PromptConfig, PromptEncoder
from mmart.model.checkpoint import add_lora, lora_config
from mmart.model.packing import collate_rows
from mmart.model.scoring import score_batch
from mmart.model.testing import tiny_chooser
from mmart.train.data import decision_rows
from mmart.train.dpo_fast import fast_dpo_loss
from mmart.train.sft import choice_loss


@pytest.fixture(scope="module")
def contract(tiny_world):
    return load_contract(tiny_world)


def _rows(contract, answer: str, arch: str = "llama", preference: bool = False):
    arts = list(contract.frame("artworks").artwork_id)
    model, tok = tiny_chooser(arch, tokens_per_artwork=1, projector_tokens=2, num_artworks=len(arts))
    index = {a: i for i, a in enumerate(arts)}
    builder = ExampleBuilder(contract, PromptConfig(answer=answer, max_history=3, names=False, synopsis=False))
    pool = builder.preference_examples("train") if preference else builder.pair_examples("train", labels=True)
    counts = Counter(e.user_id for e in pool)
    members = {u for u, n in counts.most_common(4) if n >= 2}
    examples = [e for e in pool if e.user_id in members]
    enc = PromptEncoder(builder, tok, slots_per_artwork=2)
    rows_of = lambda ids: [index[a] for a in ids]  # noqa: E731
    teacher = None if preference else fit_reward_model(contract)
    alone = decision_rows(enc, examples, rows_of, 1, teacher, 0.5, propensity_clip=10.0).to_list()
    packed = decision_rows(enc, examples, rows_of, 8, teacher, 0.5, propensity_clip=10.0).to_list()
    assert len(packed) < len(alone) == len(examples)
    return add_lora(model, lora_config(r=4, alpha=8, dropout=0.0)), tok, alone, packed


@pytest.mark.parametrize("answer", ["per_candidate", "letter"])
def test_packed_sft_loss_is_the_mean_of_unpacked_losses(contract, answer: str) -> None:
    model, tok, alone, packed = _rows(contract, answer)
    with torch.no_grad():
        batch = collate_rows(packed, tok.pad_token_id)
        packed_loss, _ = choice_loss(score_batch(model, batch), batch, teacher_weight=0.6)
        losses = []
        for row in alone:
            one = collate_rows([row], tok.pad_token_id)
            losses.append(choice_loss(score_batch(model, one), one, teacher_weight=0.6)[0])
    assert any(c < 0 for r in alone for c in r["chosen"]) and any(c >= 0 for r in alone for c in r["chosen"])
    torch.testing.assert_close(packed_loss, torch.stack(losses).mean(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("two_pass", [False, True], ids=["one-pass", "cached-prefix"])
def test_packed_sft_gradients_equal_unpacked_gradients(contract, two_pass: bool) -> None:
    """Also through the cached prefix: the blocks' gradients flow back into the prefix pass."""
    model, tok, alone, packed = _rows(contract, "per_candidate", arch="qwen2")

    def grads(rows) -> torch.Tensor:
        model.zero_grad()
        batch = collate_rows(rows, tok.pad_token_id)
        choice_loss(score_batch(model, batch, two_pass=two_pass), batch, teacher_weight=0.6)[0].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(grads(packed), grads(alone), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("answer", ["per_candidate", "letter"])
def test_packed_fast_dpo_loss_equals_unpacked(contract, answer: str) -> None:
    model, tok, alone, packed = _rows(contract, answer, preference=True)
    with torch.no_grad():
        for name, p in model.named_parameters():  # policy != reference
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
        a = fast_dpo_loss(model, collate_rows(alone, tok.pad_token_id), beta=0.5)
        p = fast_dpo_loss(model, collate_rows(packed, tok.pad_token_id), beta=0.5)
    assert a.pair_mask.sum() == p.pair_mask.sum() > len(alone)
    torch.testing.assert_close(p.loss, a.loss, rtol=0, atol=1e-5)
    assert abs(float(a.loss) - float(torch.log(torch.tensor(2.0)))) > 1e-3  # not a trivial policy == reference
