"""Prompts: history before the decision, most recent first, budget cuts the oldest; shuffled letters; pairs."""

from __future__ import annotations

from collections import Counter

import pytest

from mmart.data.contract import load_contract
from mmart.errors import UserError
from mmart.examples import ExampleBuilder, PromptConfig, PromptEncoder
from mmart.model.llm import SLOT_TOKEN
from mmart.model.readout import Art, Text
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
    for line, ev in zip(lines, events):
        assert names[ev["title_id"]] in line[0].text
        assert [p.artwork_id for p in line if isinstance(p, Art)] == ([ev["artwork_id"]] if ev.get("artwork_id") else [])
    assert [e["timestamp"] for e in events] == sorted((e["timestamp"] for e in events), reverse=True)


def test_token_budget_drops_the_oldest_never_the_candidates(contract):
    tok = tiny_tokenizer()
    full = PromptEncoder(ExampleBuilder(contract, PromptConfig(max_history=50, history_token_budget=100_000)), tok)
    tight = PromptEncoder(ExampleBuilder(contract, PromptConfig(max_history=50, history_token_budget=40)), tok)
    ex = max(full.builder.choice_examples("train"), key=lambda e: len(full.builder.history_lines(e)))
    long, short = full.decision(ex), tight.decision(ex)
    assert len(short.prefix.ids) < len(long.prefix.ids)
    assert short.block.ids == long.block.ids and short.block.artworks == ex.candidates  # the title block is whole
    kept = [line for line in tok.decode(short.prefix.ids).splitlines() if line.startswith("- ")]
    all_lines = [line for line in tok.decode(long.prefix.ids).splitlines() if line.startswith("- ")]
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
    b = ExampleBuilder(contract, PromptConfig())
    ex = b.choice_examples("train")[0]
    d = PromptEncoder(b, tok, slots_per_artwork=2).decision(ex)
    slot = tok.convert_tokens_to_ids(SLOT_TOKEN)
    ids, arts = d.prefix.ids + d.block.ids, d.prefix.artworks + d.block.artworks
    assert ids.count(slot) == 2 * len(arts) and d.block.artworks == ex.candidates and len(d.read_ids) == 3
    cap = PromptEncoder(ExampleBuilder(contract, PromptConfig(artwork_input="caption")), tok).decision(ex)
    assert cap.prefix.artworks == cap.block.artworks == [] and slot not in cap.prefix.ids + cap.block.ids
    assert "artwork:" in tok.decode(cap.block.ids)


def test_prefix_and_block_split_the_chat_and_letter_blocks_end_at_the_answer(contract):
    """The prefix opens the chat (system turn); a letter block closes it with the generation prompt."""
    tok = tiny_tokenizer()
    enc = PromptEncoder(ExampleBuilder(contract, PromptConfig(answer="letter")), tok)
    ex = enc.builder.choice_examples("train")[0]
    d = enc.decision(ex)
    prefix, block = tok.decode(d.prefix.ids), tok.decode(d.block.ids)
    assert prefix.startswith("<|im_start|>system") and "History, most recent first:" in prefix
    assert block.startswith("Title:") and block.endswith("<|im_start|>assistant\n")
    assert d.block.reads == [len(d.block.ids) - 1] * len(ex.candidates)  # every letter read at the answer
    whole = tok.apply_chat_template(
        [{"role": "system", "content": "Pick the artwork this streaming member is most likely to play."},
         {"role": "user", "content": (prefix + block).split("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]}],
        tokenize=False, add_generation_prompt=True)
    assert whole == prefix + block  # the two parts are exactly the chat template's rendering


def test_decisions_of_one_member_and_history_share_the_prefix(contract):
    tok = tiny_tokenizer()
    enc = PromptEncoder(ExampleBuilder(contract, PromptConfig()), tok)
    exs = enc.builder.pair_examples("train")
    by_key = {}
    for ex in exs:
        by_key.setdefault(enc.builder.prefix_key(ex), []).append(enc.decision(ex))
    shared = [ds for ds in by_key.values() if len(ds) > 1]
    assert shared
    for ds in shared:
        assert all(d.prefix.ids == ds[0].prefix.ids and d.example.user_id == ds[0].example.user_id for d in ds)


def test_pair_examples_one_per_pair(contract):
    b = ExampleBuilder(contract, PromptConfig())
    pairs = b.pair_examples("test")
    imps = contract.frame("impressions")
    assert len(pairs) == len(imps[imps.split == "test"].groupby(["user_id", "title_id"]))
    assert all(e.answer is None for e in pairs)
    labelled = b.pair_examples("train", labels=True)
    played = imps[(imps.split == "train") & imps.played]
    assert sum(e.answer is not None for e in labelled) == len(played.groupby(["user_id", "title_id"]))
    for e in labelled:
        assert e.answer is None or e.candidates[e.answer] == e.shown_artwork_id
        assert e.answer not in e.rejected


@pytest.mark.parametrize("artwork_input", ["embeddings", "caption"])
def test_per_candidate_positions_follow_each_candidate(contract, artwork_input):
    """Each read position is the marker right after its own candidate's artwork; the block ends at the last one."""
    tok = tiny_tokenizer()
    b = ExampleBuilder(contract, PromptConfig(answer="per_candidate", artwork_input=artwork_input))
    ex = b.choice_examples("train")[0]
    d = PromptEncoder(b, tok, slots_per_artwork=2).decision(ex)
    pos, ids = d.block.reads, d.block.ids
    k = len(ex.candidates)
    assert len(pos) == k == len(d.read_ids) and pos == sorted(set(pos))
    assert pos[-1] == len(ids) - 1  # nothing after the last read position
    for i in range(k):
        text = tok.decode(ids[: pos[i] + 1])
        assert text.endswith(" match") and text.count(" match") == i + 1
    if artwork_input == "embeddings":
        slot = tok.convert_tokens_to_ids(SLOT_TOKEN)
        slots = [j for j, t in enumerate(ids) if t == slot]
        assert len(slots) == 2 * k
        for i in range(k):  # candidate i's two slots lie between the previous marker and its own
            lo = pos[i - 1] if i else -1
            assert all(lo < s < pos[i] for s in slots[2 * i: 2 * i + 2])


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
    tok = tiny_tokenizer()
    assert line in PromptEncoder(b, tok).text(ex)  # all history counted, though only 1 line is shown
    assert "Played from looks" not in PromptEncoder(ExampleBuilder(contract, PromptConfig()), tok).text(ex)


def _pairs(group: str) -> list[str]:
    words = group.split(" ")
    return [f"{words[i]} {words[i + 1]}" for i in range(0, len(words), 2)]


def test_chosen_summary_lists_the_looks_played_beyond_what_the_titles_offered(contract):
    """Per look: plays from an artwork with it, less the share of the title's artworks that had it (a look
    every candidate carries was no choice), summed over the history; only the preferred ones are shown."""
    b = ExampleBuilder(contract, PromptConfig(history_summary=True, history_summary_looks="chosen"))
    checked = 0
    for ex in b.pair_examples("train")[:60]:
        margin = Counter()
        for e in b.history[ex.user_id]:
            offered = b.artworks_of[e["title_id"]]
            if e["timestamp"] < ex.timestamp and e.get("artwork_id") and len(offered) > 1:
                margin.update({t.rpartition(":")[2]: 1.0 for t in b.tags[e["artwork_id"]]})
                margin.subtract({t.rpartition(":")[2]: n / len(offered)
                                 for t, n in Counter(t for a in offered for t in b.tags[a]).items()})
        line = b.history_summary(ex)
        if line is None:
            assert all(round(v) <= 0 for v in margin.values())
            continue
        assert line.startswith("Chose looks over the others: ")
        found = {k: int(v) for group in line.split(": ", 1)[1].split("; ") for k, v in
                 (pair.rsplit(" ", 1) for pair in _pairs(group))}
        assert found == {k: round(v) for k, v in margin.items() if round(v) > 0}
        checked += 1
    assert checked > 10


def test_repeated_margins_say_what_the_numbers_say(contract):
    """``history_summary_margins: repeat`` writes each margin as that many copies of the look's word: the same
    looks, in the same order, as often as the numbered line says."""
    numbers = ExampleBuilder(contract, PromptConfig(history_summary=True, history_summary_looks="chosen"))
    repeat = ExampleBuilder(contract, PromptConfig(history_summary=True, history_summary_looks="chosen",
                                                   history_summary_margins="repeat"))
    checked = 0
    for ex in numbers.pair_examples("train")[:60]:
        line = numbers.history_summary(ex)
        if line is None:
            assert repeat.history_summary(ex) is None
            continue
        expected = [" ".join(" ".join([v] * int(n)) for v, n in (p.rsplit(" +", 1) for p in _pairs(group)))
                    for group in line.split(": ", 1)[1].split("; ")]
        assert repeat.history_summary(ex) == "Chose looks over the others: " + "; ".join(expected)
        checked += any(" +2" in p or " +3" in p for p in _pairs(line.split(": ", 1)[1]))
    assert checked > 0  # some margin above 1 was repeated
    with pytest.raises(UserError, match="history_summary_looks=chosen"):
        PromptConfig(history_summary=True, history_summary_margins="repeat")


def test_genre_line_counts_every_title_watched_before_the_decision(contract):
    b = ExampleBuilder(contract, PromptConfig(history_genres=2, max_history=1))
    ex = next(e for e in b.choice_examples("train") if len(b.history_events(e)) >= 3)
    events = [e for e in b.history[ex.user_id] if e["timestamp"] < ex.timestamp]
    counts = Counter(g for e in events for g in b.titles[e["title_id"]].genres)
    line = b.genre_summary(ex)
    head, listed = line.split(": ", 1)
    assert head == f"Watched {len(events)} titles"
    found = {g: int(n) for g, n in (item.rsplit(" ", 1) for item in listed.split(", "))}
    assert len(found) == 2 and all(counts[g] == n for g, n in found.items())
    assert min(found.values()) >= max(n for g, n in counts.items() if g not in found)  # the 2 most watched
    tok = tiny_tokenizer()
    assert line in PromptEncoder(b, tok).text(ex)  # the whole history, though only 1 line is shown
    assert "Watched " not in PromptEncoder(ExampleBuilder(contract, PromptConfig(max_history=1)), tok).text(ex)


def test_max_history_zero_leaves_only_the_summary(contract):
    b = ExampleBuilder(contract, PromptConfig(history_summary=True, max_history=0))
    ex = next(e for e in b.choice_examples("train") if b.history_summary(e))
    assert b.history_lines(ex) == []
    pieces = b.prefix_pieces(ex)
    assert len(pieces) == 1 and isinstance(pieces[0], Text) and pieces[0].text.startswith("Played from looks: ")
    d = PromptEncoder(b, tiny_tokenizer()).decision(ex)
    assert d.prefix.artworks == [] and d.block.artworks == list(ex.candidates)  # only the candidates' slots



def test_unlogged_titles_are_new_to_the_member_and_share_its_prefix(contract):
    """Teacher-only decisions: titles never shown to nor watched by the member, at the prefix's time."""
    b = ExampleBuilder(contract, PromptConfig(answer="per_candidate"))
    logged = b.pair_examples("train", labels=True)[:30]
    extra = b.unlogged_examples(logged, 3, seed=0)
    keys = {b.prefix_key(e) for e in logged}
    assert len(extra) == 3 * len(keys)
    shown = set(zip(b.impressions.user_id, b.impressions.title_id))
    for e in extra:
        assert b.prefix_key(e) in keys and e.answer is None and not e.rejected
        assert (e.user_id, e.title_id) not in shown
        assert e.title_id not in {h["title_id"] for h in b.history[e.user_id]}
        assert sorted(e.candidates) == sorted(b.artworks_of[e.title_id])
    assert len({e.example_id for e in extra}) == len(extra)
    assert b.unlogged_examples(logged, 3, seed=0) == extra and b.unlogged_examples(logged, 3, seed=1) != extra
