"""sft.reasoning: before_answer (the paper's): the model writes its rationale, then answers after it."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from mmart.data.contract import load_contract
from mmart.examples import ANSWER_CUE, ExampleBuilder, PromptConfig, PromptEncoder
from mmart.model.explain import write_rationales
from mmart.model.packing import IGNORE, collate_rows
from mmart.model.scoring import score_batch
from mmart.model.testing import tiny_chooser
from mmart.train.data import decision_rows


@pytest.fixture(scope="module")
def setup(tiny_world):
    contract = load_contract(tiny_world)
    arts = list(contract.frame("artworks").artwork_id)
    model, tok = tiny_chooser("llama", tokens_per_artwork=1, projector_tokens=2, num_artworks=len(arts))
    model.eval()
    index = {a: i for i, a in enumerate(arts)}
    builder = ExampleBuilder(contract, PromptConfig(answer="letter", max_history=3, names=False, synopsis=False))
    pool = builder.pair_examples("train", labels=True)
    members = {u for u, n in Counter(e.user_id for e in pool).most_common(3) if n >= 2}
    examples = [e for e in pool if e.user_id in members]
    enc = PromptEncoder(builder, tok, slots_per_artwork=2)
    return model, tok, enc, examples, (lambda ids: [index[a] for a in ids])


def test_only_the_rationale_and_its_cue_are_trained_and_the_letters_are_read_after_them(setup) -> None:
    _, tok, enc, examples, rows_of = setup
    said = {e.example_id: f"the member played close-ups {i} times" for i, e in enumerate(examples)}
    rows = decision_rows(enc, examples, rows_of, 8, propensity_clip=10.0, rationales=said, reasoning="before_answer")
    for row in rows.to_list():
        ids, labels, owner = row["input_ids"], row["rationale_labels"], row["rationale_owner"]
        for j, eid in enumerate(row["example_id"]):
            trained = [t for t, o in zip(labels, owner) if o == j]
            assert tok.decode(trained) == said[eid] + ANSWER_CUE  # the rationale and the cue, nothing else
            reads = set(row["score_positions"][j])
            assert len(reads) == 1  # one answer position, right after the cue
            at = reads.pop()
            assert max(i for i, o in enumerate(owner) if o == j) == at
            assert tok.decode(row["answer_ids"][j]).split() == list("ABCDEFGH"[: len(row["answer_ids"][j])])
        assert all((lab == IGNORE) == (o == -1) for lab, o in zip(labels, owner))
    unlabelled = decision_rows(enc, examples, rows_of, 8, rationales=said, reasoning="before_answer",
                               train_rationales=False).to_list()
    assert "rationale_labels" not in unlabelled[0]  # scoring and DPO read the rationale, never train it
    assert [r["input_ids"] for r in unlabelled] == [r["input_ids"] for r in rows.to_list()]


def test_scores_read_after_the_rationale_depend_on_it(setup) -> None:
    model, tok, enc, examples, rows_of = setup

    def scores(text: str) -> torch.Tensor:
        rows = decision_rows(enc, examples[:3], rows_of, 8, rationales=[text] * 3, reasoning="before_answer",
                             train_rationales=False).to_list()
        with torch.no_grad():
            return score_batch(model, collate_rows(rows, tok.pad_token_id))

    assert not torch.allclose(scores("she plays close-ups"), scores("dark posters win every time"))


@pytest.mark.parametrize("shared_from", [1, 10**6])
def test_generated_rationales_equal_generation_from_each_full_prompt(setup, monkeypatch, shared_from: int) -> None:
    """Batched behind one cached member prefix (padding between prefix and block), or pooled as whole prompts
    (left padding) = each title alone, from its whole unpacked prompt, no cache shared."""
    import mmart.model.explain as explain

    monkeypatch.setattr(explain, "SHARED_PREFIX_MIN", shared_from)
    model, tok, enc, examples, rows_of = setup
    decisions = [enc.decision(e) for e in examples]
    batched = write_rationales(model, enc, decisions, "before_answer", 6, rows_of, progress=False)
    for d, text in zip(decisions, batched):
        ids = torch.tensor([d.prefix.ids + d.block.ids])
        arts = torch.tensor([rows_of(d.prefix.artworks + d.block.artworks)])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), artwork_ids=arts,
                                 max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=[tok.eos_token_id, *tok("\n", add_special_tokens=False)["input_ids"]])
        alone = tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
        assert text == " ".join(alone.split("\n", 1)[0].split())
    assert any(batched)


def test_the_auxiliary_prompt_ends_at_the_rationale_cue(setup) -> None:
    _, tok, enc, examples, _ = setup
    d = enc.decision(examples[0])
    aux = enc.rationale_prompt(d, "auxiliary")
    assert tok.decode(aux.ids).endswith("\nWhy:") and aux.artworks == d.block.artworks
    from mmart.errors import UserError

    with pytest.raises(UserError, match="sft.reasoning='none' writes no rationale"):
        enc.rationale_prompt(d, "none")


def test_before_answer_trains_then_predict_and_the_api_write_the_models_own_rationale(cfg, tmp_path) -> None:
    """SFT on a rationales table, DPO after the SFT model's own rationales, predict with a `rationale` column
    and scores read after it, and the home-page API explaining its choice."""
    from mmart.artefacts import read_record
    from mmart.predict import predict
    from mmart.rationale.stage import run_rationales
    from mmart.serve import HomePageChooser, Watched
    from mmart.train.dpo import run_dpo
    from mmart.train.sft import run_sft

    from _runs import with_out  # tests/train/_runs.py

    run = with_out(cfg, tmp_path / "out")
    run = dataclasses.replace(
        run, prompt=dataclasses.replace(run.prompt, answer="letter"),
        sft=dataclasses.replace(run.sft, reasoning="before_answer", reasoning_max_tokens=5, eval_examples=0),
        dpo=dataclasses.replace(run.dpo, eval_examples=0))
    run_rationales(run)
    sft = run_sft(run)
    assert read_record(sft)["config"]["sft"]["reasoning"] == "before_answer"
    dpo = run_dpo(run)
    frame = predict(dpo, run.data_dir, "test", tmp_path / "preds.parquet", cfg=run, max_pairs=6, progress=False)
    assert "rationale" in frame.columns and frame.rationale.map(lambda r: isinstance(r, str)).all()
    assert frame.probs.map(lambda p: abs(sum(p) - 1) < 1e-4).all()
    assert read_record(tmp_path / "preds.parquet")["config"]["explain"] is True

    chooser = HomePageChooser.load(dpo, run.data_dir, cfg=run)
    imps = frame.iloc[0]
    titles = {imps.title_id: list(imps.candidates)}
    explained = chooser.choose_explained([Watched(imps.title_id, 4, imps.candidates[0], 1)], titles)
    plain = chooser.choose([Watched(imps.title_id, 4, imps.candidates[0], 1)], titles)
    assert isinstance(explained[imps.title_id].rationale, str)
    assert explained[imps.title_id].probs == pytest.approx(plain[imps.title_id], abs=1e-5)  # same rationale, greedy
