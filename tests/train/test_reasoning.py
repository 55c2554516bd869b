"""sft.reasoning: auxiliary: rationale blocks behind the member prefix, trained as text, never scored."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from mmart.artefacts import FIELDS_ADDED, RECORD_FORMAT, differences, made_from
from mmart.config import PipelineConfig, apply_overrides
from mmart.data.contract import load_contract
from mmart.errors import ConfigError, UserError
from mmart.examples import RATIONALE_CUE, ExampleBuilder, PromptConfig, PromptEncoder
from mmart.model.checkpoint import add_lora, lora_config
from mmart.model.packing import IGNORE, attention_inputs, collate_rows
from mmart.model.scoring import score_batch
from mmart.model.testing import tiny_chooser
from mmart.train.data import decision_rows
from mmart.train.reasoning import scores_and_rationale_ce
from mmart.train.sft import run_sft, sft_loss

READOUTS = [("per_candidate", "title"), ("letter", "title"), ("per_candidate", "own")]


@pytest.fixture(scope="module")
def contract(tiny_world):
    return load_contract(tiny_world)


def _setup(contract, answer: str = "per_candidate", context: str = "title"):
    """A tiny LoRA chooser and the rows of some members' decisions, without and with rationale blocks
    (every other decision has a rationale, so rows mix decisions with and without one)."""
    arts = list(contract.frame("artworks").artwork_id)
    model, tok = tiny_chooser("llama", tokens_per_artwork=1, projector_tokens=2, num_artworks=len(arts))
    index = {a: i for i, a in enumerate(arts)}
    builder = ExampleBuilder(contract, PromptConfig(answer=answer, max_history=3, names=False, synopsis=False,
                                                    candidate_context=context))
    pool = builder.pair_examples("train", labels=True)
    counts = Counter(e.user_id for e in pool)
    members = {u for u, n in counts.most_common(3) if n >= 2}
    examples = [e for e in pool if e.user_id in members]
    rationales = {e.example_id: f"the member played close-up looks {i} times" for i, e in enumerate(examples)
                  if i % 2 == 0}
    enc = PromptEncoder(builder, tok, slots_per_artwork=2)
    rows_of = lambda ids: [index[a] for a in ids]  # noqa: E731
    plain = decision_rows(enc, examples, rows_of, 8, propensity_clip=10.0).to_list()
    aux = decision_rows(enc, examples, rows_of, 8, propensity_clip=10.0, rationales=rationales).to_list()
    model = add_lora(model, lora_config(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero: move it, so LoRA's gradients and outputs are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model, tok, enc, examples, rationales, plain, aux


@pytest.mark.parametrize("answer,context", READOUTS)
def test_only_the_rationale_tokens_carry_labels(contract, answer: str, context: str) -> None:
    _, tok, enc, examples, rationales, plain, aux = _setup(contract, answer, context)
    by_id = {e.example_id: e for e in examples}
    assert [len(r["example_id"]) for r in aux] == [len(r["example_id"]) for r in plain]
    for p, row in zip(plain, aux):
        n = len(p["input_ids"])
        assert row["input_ids"][:n] == p["input_ids"] and row["segment_ids"][:n] == p["segment_ids"]
        assert row["score_positions"] == p["score_positions"]  # the title blocks are where they were
        labels, owner = row["rationale_labels"], row["rationale_owner"]
        assert len(labels) == len(owner) == len(row["input_ids"])
        assert all(x == IGNORE for x in labels[:n]) and all(o == -1 for o in owner[:n])  # prefix, title blocks
        last_title = max(p["segment_ids"])
        for j, eid in enumerate(row["example_id"]):
            mine = [i for i, o in enumerate(owner) if o == j]
            if eid not in rationales:
                assert not mine
                continue
            segment = {row["segment_ids"][i] for i in mine}
            assert len(segment) == 1 and segment.pop() > last_title
            block = [i for i, s in enumerate(row["segment_ids"]) if s == row["segment_ids"][mine[0]]]
            assert mine == block[len(block) - len(mine):]  # the block's tail: its title part and cue are not trained
            assert [labels[i] for i in mine] == [row["input_ids"][i] for i in mine]
            assert tok.decode([labels[i] for i in mine]).strip() == rationales[eid]
            head = tok.decode([row["input_ids"][i] for i in block[: len(block) - len(mine)]])
            assert head.endswith(RATIONALE_CUE)
            title = enc.builder.title_line(by_id[eid])
            assert title in head  # the decision's title block leads the rationale block
            slots = sum(1 for i in block if row["input_ids"][i] == enc.slot_id)
            assert slots == 2 * len(by_id[eid].candidates)  # with every candidate's artwork slots


@pytest.mark.parametrize("answer,context", READOUTS)
def test_auxiliary_at_weight_zero_is_the_choice_loss_with_its_gradients(contract, answer: str, context: str) -> None:
    model, tok, _, _, _, plain, aux = _setup(contract, answer, context)

    def run(rows, weight: float):
        model.zero_grad()
        batch = collate_rows(rows, tok.pad_token_id)
        loss, _, metrics = sft_loss(model, batch, teacher_weight=0.5, reasoning_weight=weight)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return loss.detach(), grads, metrics

    none_loss, none_grads, none_metrics = run(plain, 0.7)  # rows without rationales: no rationale term at all
    zero_loss, zero_grads, zero_metrics = run(aux, 0.0)
    torch.testing.assert_close(zero_loss, none_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(zero_grads, none_grads, rtol=1e-3, atol=1e-6)
    assert "rationale_ce" not in none_metrics and zero_metrics["rationale_ce"] > 0
    with_loss, with_grads, _ = run(aux, 0.7)
    torch.testing.assert_close(with_loss, none_loss + 0.7 * zero_metrics["rationale_ce"], rtol=0, atol=1e-4)
    assert not torch.allclose(with_grads, none_grads)


def test_the_rationale_loss_is_the_mean_over_decisions_of_their_token_mean(contract) -> None:
    model, tok, _, _, _, _, aux = _setup(contract)
    batch = collate_rows(aux, tok.pad_token_id)
    with torch.no_grad():
        _, ce, has = scores_and_rationale_ce(model, batch)
        logits = model(input_ids=batch["input_ids"], artwork_ids=batch["artwork_ids"],
                       position_ids=batch["position_ids"],
                       attention_mask=attention_inputs(model, batch)).logits.float()
    labels, owner = batch["rationale_labels"], batch["rationale_owner"]
    expected = torch.zeros_like(ce)
    for b in range(labels.shape[0]):
        for j in range(ce.shape[1]):
            at = (owner[b] == j).nonzero().flatten()
            if len(at):
                expected[b, j] = torch.nn.functional.cross_entropy(logits[b, at - 1], labels[b, at])
    assert has.sum() == sum(1 for r in aux for o in set(r["rationale_owner"]) if o >= 0)
    torch.testing.assert_close(ce, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("answer,context", READOUTS)
def test_rationale_blocks_neither_change_scores_nor_see_other_titles(contract, answer: str, context: str) -> None:
    model, tok, enc, _, _, plain, aux = _setup(contract, answer, context)
    with torch.no_grad():
        alone = score_batch(model, collate_rows(plain, tok.pad_token_id), two_pass=False)
        batch = collate_rows(aux, tok.pad_token_id)
        scores, ce, has = scores_and_rationale_ce(model, batch)
        torch.testing.assert_close(scores, alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(score_batch(model, batch, two_pass=False), alone, rtol=0, atol=1e-5)

        # Every title block's text tokens changed (slots kept): the scores move, no rationale's loss does.
        ids = batch["input_ids"]
        last_title = torch.tensor([max(p["segment_ids"]) for p in plain]).unsqueeze(-1)
        title = (batch["segment_ids"] > 0) & (batch["segment_ids"] <= last_title) & (ids != enc.slot_id)
        other = dict(batch, input_ids=torch.where(title, ids[0, 0], ids))  # the first prefix token: not a slot
        moved, ce_other, _ = scores_and_rationale_ce(model, other)
    assert not torch.allclose(moved[torch.isfinite(moved)], scores[torch.isfinite(scores)])
    torch.testing.assert_close(ce_other[has], ce[has], rtol=0, atol=1e-5)


def test_the_record_changes_for_auxiliary_only(tmp_path) -> None:
    cfg = apply_overrides(PipelineConfig(), [f"data_dir={tmp_path}/data", f"output_dir={tmp_path}/out"])
    now = made_from(cfg, "sft")
    assert RECORD_FORMAT >= 3 and FIELDS_ADDED[3] == {"sft.reasoning": "none", "sft.reasoning_weight": 0.5}
    older = {**now, "config": {**now["config"], "sft": {k: v for k, v in now["config"]["sft"].items()
                                                        if k not in ("reasoning", "reasoning_weight",
                                                                     "reasoning_max_tokens")}}, "format": 2}
    assert differences(older, now) == []  # a model trained before the field existed is still fresh
    assert differences({**older, "format": 3}, now)  # a current record lacking them differs for real
    aux = made_from(apply_overrides(cfg, ["sft.reasoning=auxiliary"]), "sft")
    assert any(d.startswith("config.sft.reasoning") for d in differences(older, aux))
    assert "rationales" in aux["inputs"] and "rationales" not in now["inputs"]
    weighted = made_from(apply_overrides(cfg, ["sft.reasoning=auxiliary", "sft.reasoning_weight=0.2"]), "sft")
    assert differences(aux, weighted)


BAD = [("sft.reasoning_weight=-1", r"sft\.reasoning_weight must be >= 0"),
       ("sft.reasoning=chain", r"sft\.reasoning: 'chain' is not one of \['none', 'before_answer', 'auxiliary'\]"),
       ("prompt.answer=per_candidate sft.reasoning=before_answer", r"sft\.reasoning=before_answer needs prompt\.answer: letter"),
       ("sft.reasoning_max_tokens=0", r"sft\.reasoning_max_tokens must be >= 1")]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_reasoning_settings_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), override.split())


def test_sft_refuses_a_missing_or_stale_table_and_writes_nothing(cfg, tmp_path) -> None:
    from mmart.artefacts import write_record

    aux = dataclasses.replace(cfg, output_dir=str(tmp_path / "out"),
                              sft=dataclasses.replace(cfg.sft, reasoning="auxiliary"))
    with pytest.raises(UserError, match=r"rationales table .* missing: run `mmart rationales --config \.\.\.`"):
        run_sft(aux)
    assert not (tmp_path / "out").exists()

    table = tmp_path / "out" / "rationales" / "rationales.parquet"
    table.parent.mkdir(parents=True)
    table.write_bytes(b"not what this config would make")
    write_record(table, {"stage": "rationales", "config": {"teacher": "llm"}, "inputs": {}})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"is stale \(.*\): run `mmart rationales --config \.\.\.`"):
        run_sft(aux)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_auxiliary_sft_trains_on_the_rationales_table_end_to_end(cfg, tmp_path) -> None:
    import json

    from mmart.artefacts import read_record, stale
    from mmart.rationale.stage import run_rationales

    from _runs import with_out  # tests/train/_runs.py

    aux = with_out(cfg, tmp_path / "out")
    aux = dataclasses.replace(aux, sft=dataclasses.replace(aux.sft, reasoning="auxiliary", reasoning_weight=0.3,
                                                           eval_examples=0))
    run_rationales(aux)
    model = run_sft(aux)
    record = read_record(model)
    assert record["config"]["sft"]["reasoning"] == "auxiliary" and record["inputs"]["rationales"]
    assert stale(model, made_from(aux, "sft")) == []
    history = json.loads(sorted((tmp_path / "out" / "sft").rglob("trainer_state.json"))[-1].read_text())["log_history"]
    assert any(h.get("rationale_ce", 0) > 0 for h in history)  # the rationale loss was trained and logged
    assert stale(model, made_from(dataclasses.replace(aux, sft=dataclasses.replace(aux.sft, reasoning="none")), "sft"))
