"""Prompts: history before the decision, most recent first, budget cuts the oldest; shuffled letters; pairs."""

from __future__ import annotations

from collections import Counter

import pytest

from mmart.data.contract import load_contract
from mmart.examples import SLOT_TOKEN, ExampleBuilder, PromptConfig, encode
from mmart.model.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def contract(tiny_world):
    return load_contract(tiny_world)


def test_history_is_before_the_decision_most_recent_first(contract):
    b = ExampleBuilder(contract, PromptConfig(max_history=50))
    ex = b.choice_examples("train")[0]
    events = [e for e in b.history[ex.user_id] if e["timestamp"] < ex.timestamp]
    lines = b.history_lines(ex)
    assert len(lines) == len(events) > 0
    names = {r.title_id: r.name for r in b.titles.values()}
    for (text, _), ev in zip(lines, events):
        assert names[ev["title_id"]] in text
    assert [e["timestamp"] for e in events] == sorted((e["timestamp"] for e in events), reverse=True)


def test_token_budget_drops_the_oldest_never_the_candidates(contract):
    tok = tiny_tokenizer()
    full = ExampleBuilder(contract, PromptConfig(max_history=50, history_token_budget=100_000))
    tight = ExampleBuilder(contract, PromptConfig(max_history=50, history_token_budget=40))
    ex = max(full.choice_examples("train"), key=lambda e: len(full.history_lines(e)))
    long_msgs, long_arts = full.messages(ex, count_tokens=lambda t: len(tok(t)["input_ids"]))
    short_msgs, short_arts = tight.messages(ex, count_tokens=lambda t: len(tok(t)["input_ids"]))
    assert len(short_msgs[1]["content"]) < len(long_msgs[1]["content"])
    assert short_arts[-len(ex.candidates):] == ex.candidates == long_arts[-len(ex.candidates):]
    kept = [line for line in short_msgs[1]["content"].splitlines() if line.startswith("- ")]
    all_lines = [line for line in long_msgs[1]["content"].splitlines() if line.startswith("- ")]
    assert 1 <= len(kept) < len(all_lines) and kept == all_lines[: len(kept)]  # the most recent survive


def test_candidate_order_is_shuffled_per_example_and_seeded(contract):
    a = ExampleBuilder(contract, PromptConfig(shuffle_seed=0)).choice_examples("train")
    again = ExampleBuilder(contract, PromptConfig(shuffle_seed=0)).choice_examples("train")
    other = ExampleBuilder(contract, PromptConfig(shuffle_seed=1)).choice_examples("train")
    assert [e.candidates for e in a] == [e.candidates for e in again]
    assert [e.candidates for e in a] != [e.candidates for e in other]
    answers = Counter(e.answer for e in a)
    assert len(answers) == 3 and min(answers.values()) >= len(a) / 3 * 0.5  # no letter favoured
    for e in a:
        assert e.candidates[e.answer] == e.shown_artwork_id


def test_preference_pairs_use_logged_rejections(contract):
    b = ExampleBuilder(contract, PromptConfig())
    imps = contract.frame("impressions")
    prefs = b.preference_examples("train")
    assert prefs and all(e.answer not in e.rejected and e.rejected for e in prefs)
    logged = 0
    for e in prefs:
        rows = imps[(imps.user_id == e.user_id) & (imps.title_id == e.title_id) & ~imps.played]
        skipped = set(rows.shown_artwork_id) - {e.shown_artwork_id}
        if skipped:
            logged += 1
            assert {e.candidates[i] for i in e.rejected} == skipped
        else:
            assert len(e.rejected) == len(e.candidates) - 1
    assert logged > 0


def test_encode_slots_match_artworks_and_caption_mode_has_none(contract):
    tok = tiny_tokenizer()
    b = ExampleBuilder(contract, PromptConfig(), tokens_per_artwork=2)
    ex = b.choice_examples("train")[0]
    enc = encode(b, ex, tok)
    slot = tok.convert_tokens_to_ids(SLOT_TOKEN)
    assert enc["input_ids"].count(slot) == 2 * len(enc["artwork_ids"])
    assert enc["artwork_ids"][-3:] == ex.candidates and len(enc["answer_ids"]) == 3
    cap = ExampleBuilder(contract, PromptConfig(artwork_input="caption"))
    enc2 = encode(cap, ex, tok)
    assert enc2["artwork_ids"] == [] and slot not in enc2["input_ids"]
    assert "artwork:" in cap.messages(ex)[0][1]["content"]


def test_pair_examples_one_per_pair(contract):
    b = ExampleBuilder(contract, PromptConfig())
    pairs = b.pair_examples("test")
    imps = contract.frame("impressions")
    assert len(pairs) == len(imps[imps.split == "test"].groupby(["user_id", "title_id"]))
    assert all(e.answer is None for e in pairs)


@pytest.mark.parametrize("artwork_input", ["embeddings", "caption"])
def test_per_candidate_positions_follow_each_candidate(contract, artwork_input):
    """Each score position is the marker right after its own candidate's artwork; the prompt ends at the last one."""
    tok = tiny_tokenizer()
    b = ExampleBuilder(contract, PromptConfig(answer="per_candidate", artwork_input=artwork_input), tokens_per_artwork=2)
    ex = b.choice_examples("train")[0]
    enc = encode(b, ex, tok)
    pos = enc["score_positions"]
    k = len(ex.candidates)
    assert len(pos) == k == len(enc["answer_ids"]) and pos == sorted(set(pos))
    assert pos[-1] == len(enc["input_ids"]) - 1  # nothing after the last score position
    for i in range(k):
        text = tok.decode(enc["input_ids"][: pos[i] + 1])
        assert text.endswith(" match") and text.count(" match") == i + 1
    if artwork_input == "embeddings":
        slot = tok.convert_tokens_to_ids(SLOT_TOKEN)
        slots = [j for j, t in enumerate(enc["input_ids"]) if t == slot]
        cand_slots = slots[-2 * k:]
        for i in range(k):  # candidate i's two slots lie between the previous marker and its own
            lo = pos[i - 1] if i else -1
            assert all(lo < s < pos[i] for s in cand_slots[2 * i: 2 * i + 2])


def test_history_summary_counts_the_tags_of_played_from_artworks_before_the_decision(contract):
    b = ExampleBuilder(contract, PromptConfig(history_summary=True, max_history=1))
    ex = next(e for e in b.choice_examples("train") if len(b.history_lines(e)) >= 1)
    events = [e for e in b.history[ex.user_id] if e["timestamp"] < ex.timestamp and e.get("artwork_id")]
    expected = Counter(t.rpartition(":")[2] for e in events for t in b.tags[e["artwork_id"]])
    line = b.history_summary(ex)
    assert line.startswith("Played from looks: ")
    found = dict(pair.rsplit(" ", 1) for group in line.split(": ", 1)[1].split("; ") for pair in
                 _pairs(group))
    assert {k: int(v) for k, v in found.items()} == dict(expected)
    assert line in b.messages(ex)[0][1]["content"]  # all history counted, though only 1 line is shown
    assert "Played from looks" not in ExampleBuilder(contract, PromptConfig()).messages(ex)[0][1]["content"]


def _pairs(group: str) -> list[str]:
    words = group.split(" ")
    return [f"{words[i]} {words[i + 1]}" for i in range(0, len(words), 2)]


def test_max_history_zero_leaves_only_the_summary(contract):
    b = ExampleBuilder(contract, PromptConfig(history_summary=True, max_history=0))
    ex = next(e for e in b.choice_examples("train") if b.history_summary(e))
    assert b.history_lines(ex) == []
    user = b.messages(ex)[0][1]["content"]
    assert "History" not in user and user.startswith("Played from looks: ")
    _, arts = b.messages(ex)
    assert arts == list(ex.candidates)  # no history artworks, only the candidates' slots

