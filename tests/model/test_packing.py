"""Packed decisions score exactly as one prompt per decision (fp32), for both readouts and both tiny LLMs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mmart.data.contract import load_contract
from mmart.examples import ExampleBuilder, PromptConfig, PromptEncoder
from mmart.model.packing import block_attention, collate_rows, pack_decisions
from mmart.model.scoring import read_log_probs, score_batch
from mmart.model.testing import TINY_ARCHS, tiny_chooser
from mmart.model.batching import pad_artwork_ids, pad_sequences


@pytest.fixture(scope="module")
def contract(tiny_world):
    return load_contract(tiny_world)


READOUTS = ["per_candidate", "letter", "own"]  # own: per_candidate with each candidate in a block of its own


def _setup(contract, arch: str, answer: str, slots: int = 2):
    arts = list(contract.frame("artworks").artwork_id)
    model, tok = tiny_chooser(arch, tokens_per_artwork=1, projector_tokens=slots, num_artworks=len(arts))
    index = {a: i for i, a in enumerate(arts)}
    context = "own" if answer == "own" else "title"
    answer = "per_candidate" if answer == "own" else answer
    builder = ExampleBuilder(contract, PromptConfig(answer=answer, max_history=3, history_summary=True, names=False,
                                                    synopsis=False, candidate_context=context))
    enc = PromptEncoder(builder, tok, slots_per_artwork=slots)
    examples = builder.pair_examples("train")
    per_member = Counter(e.user_id for e in examples)
    members = [u for u, n in per_member.most_common(3)]
    chosen = [e for e in examples if e.user_id in members]
    assert max(per_member.values()) >= 2
    return model, tok, enc, [enc.decision(e) for e in chosen], lambda ids: [index[a] for a in ids]


@pytest.mark.parametrize("answer", READOUTS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_packed_scores_equal_unpacked_scores(contract, arch: str, answer: str) -> None:
    model, tok, _, decisions, rows_of = _setup(contract, arch, answer)
    alone = pack_decisions(decisions, 1, rows_of)
    packed = pack_decisions(decisions, 8, rows_of)
    assert len(packed) < len(alone) == len(decisions)  # some rows really hold several titles
    with torch.no_grad():
        a = score_batch(model, collate_rows(alone, tok.pad_token_id))  # [N, 1, K]
        p = score_batch(model, collate_rows(packed, tok.pad_token_id))  # [R, D, K]
    by_id = {row["example_id"][0]: a[i, 0] for i, row in enumerate(alone)}
    compared = 0
    for i, row in enumerate(packed):
        for j, eid in enumerate(row["example_id"]):
            k = len(row["answer_ids"][j])
            torch.testing.assert_close(p[i, j, :k], by_id[eid][:k], rtol=0, atol=1e-4)
            assert torch.isinf(p[i, j, k:]).all()
            compared += 1
    assert compared == len(decisions)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("answer", READOUTS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cached_prefix_pass_equals_the_one_pass_row(contract, arch: str, answer: str, attn: str) -> None:
    """Two passes (prefixes into a cache, then each block as its own row) = one pass under the block mask."""
    model, tok, _, decisions, rows_of = _setup(contract, arch, answer)
    model.config._attn_implementation = attn
    batch = collate_rows(pack_decisions(decisions, 8, rows_of), tok.pad_token_id)
    assert int(batch["segment_ids"].max()) > 1
    with torch.no_grad():
        one = score_batch(model, batch, two_pass=False)
        two = score_batch(model, batch, two_pass=True)
    assert torch.equal(torch.isinf(one), torch.isinf(two))
    torch.testing.assert_close(two[torch.isfinite(two)], one[torch.isfinite(one)], rtol=0, atol=1e-4)


def test_unpacked_row_is_the_plain_prompt(contract) -> None:
    """A one-decision row scores as the concatenated prompt does with a plain 2-D mask and no position ids."""
    model, tok, _, decisions, rows_of = _setup(contract, "llama", "per_candidate")
    d = decisions[0]
    ids, mask = pad_sequences([d.prefix.ids + d.block.ids], tok.pad_token_id)
    arts = pad_artwork_ids([rows_of(d.prefix.artworks + d.block.artworks)])
    positions = torch.tensor([[len(d.prefix.ids) + r for r in d.block.reads]])
    with torch.no_grad():
        plain = read_log_probs(model, ids, mask, arts, torch.tensor(d.read_ids), positions)
        row = score_batch(model, collate_rows(pack_decisions([d], 1, rows_of), tok.pad_token_id))[:, 0]
    torch.testing.assert_close(row, plain, rtol=0, atol=1e-5)


def test_a_block_sees_the_prefix_and_itself_only() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1]])
    m = block_attention(seg)[0, 0]
    assert m[3, :4].tolist() == [True, True, True, True] and not m[3, 4:].any()  # block 1: prefix + itself
    assert m[6, :2].all() and not m[6, 2:4].any() and m[6, 4:7].all()  # block 2 never sees block 1
    assert not m[1, 2:].any()  # the prefix is causal and never sees a block
    assert m[7].tolist() == [False] * 7 + [True]  # padding only sees itself (no empty softmax row)


def test_changing_one_title_block_leaves_the_others(contract) -> None:
    """Independence: another candidate artwork in block 1 changes block 1's scores only."""
    model, tok, _, decisions, rows_of = _setup(contract, "llama", "per_candidate")
    row = pack_decisions(decisions, 8, rows_of)[0]
    assert len(row["example_id"]) >= 2
    other = dict(row, artwork_ids=list(row["artwork_ids"]))
    first = len(decisions[0].prefix.artworks)  # the first block's first candidate follows the prefix's artworks
    other["artwork_ids"][first] = (row["artwork_ids"][first] + 1) % 50
    with torch.no_grad():
        a = score_batch(model, collate_rows([row], tok.pad_token_id))
        b = score_batch(model, collate_rows([other], tok.pad_token_id))
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
    torch.testing.assert_close(a[0, 1:], b[0, 1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_own_blocks_make_every_candidates_score_independent_of_the_candidate_order(contract, arch: str) -> None:
    """candidate_context=own: reversing the candidates reverses the scores exactly; with one block per
    title (the other candidates in view) the same model's scores move."""
    from dataclasses import replace

    moved = {}
    for answer in ("own", "per_candidate"):
        model, tok, enc, decisions, rows_of = _setup(contract, arch, answer)
        ex = next(d.example for d in decisions if len(d.example.candidates) >= 3)
        flipped = replace(ex, candidates=ex.candidates[::-1])
        rows = pack_decisions([enc.decision(ex), enc.decision(flipped)], 1, rows_of)
        with torch.no_grad():
            s = score_batch(model, collate_rows(rows, tok.pad_token_id))[:, 0]
        k = len(ex.candidates)
        moved[answer] = float((s[0, :k] - s[1, :k].flip(0)).abs().max())
    assert moved["own"] < 1e-5
    assert moved["per_candidate"] > 1e-3


def test_own_blocks_need_the_per_candidate_readout() -> None:
    from mmart.errors import UserError

    with pytest.raises(UserError, match="candidate_context=own"):
        PromptConfig(answer="letter", candidate_context="own")
