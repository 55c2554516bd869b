"""The taste teacher's rationales are faithful: they name its largest evidence, and follow the history."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
from mmart.data.contract import load_contract
from mmart.eval.teacher import fit_teacher
from mmart.examples import ExampleBuilder
from mmart.model.readout import LETTERS
from mmart.rationale.targets import sft_targets
from mmart.rationale.taste import TasteVerbaliser, contributions


def _fit(cfg):
    contract = load_contract(cfg.data_dir)
    builder = ExampleBuilder(contract, cfg.prompt)
    teacher = fit_teacher(contract, "taste", split="train")
    return builder, teacher, {t.example.example_id: t for t in sft_targets(cfg, builder, teacher)}


@pytest.fixture
def all_pairs(tiny_world) -> PipelineConfig:
    return load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [
        f"data_dir={tiny_world}", "sft.examples=pairs", "sft.teacher=taste", "sft.max_examples=0"])


def _look(tag: str) -> str:
    family, _, value = tag.partition(":")
    return f"{value} {'title size' if family == 'title' else family}"


def test_evidence_sums_to_the_teachers_margin_and_the_target_is_its_top_choice(all_pairs):
    builder, teacher, targets = _fit(all_pairs)
    import numpy as np

    for t in targets.values():
        q = teacher.predict([t.example.user_id] * len(t.example.candidates), t.example.candidates)
        logit = np.log(q) - np.log1p(-q)
        assert t.index == int(np.argmax(q))
        margin = logit[t.index] - np.delete(logit, t.index).mean()
        evidence = contributions(teacher, t.example, t.index)
        assert sum(e.contribution for e in evidence) == pytest.approx(margin, abs=1e-9)


def test_the_first_sentence_names_the_largest_contribution(all_pairs):
    builder, teacher, targets = _fit(all_pairs)
    verbalise = TasteVerbaliser(teacher, builder)
    kinds = set()
    for t in targets.values():
        top = contributions(teacher, t.example, t.index)[0]
        assert top.contribution > 0  # the teacher's top choice beats the mean alternative
        first = verbalise(t.example, t.index).split(". ")[0]
        kinds.add(top.kind)
        if top.kind.startswith("choice:"):
            family = top.kind.split(":", 1)[1]
            looks = {_look(tag) for a in t.example.candidates for tag in builder.tags[a]
                     if tag.startswith(family + ":")}
            assert any(f"offered a {look}" in first for look in looks) or "weighs" in first, (top, first)
        elif top.kind == "rate":
            assert first.startswith("Shown to members in the training logs"), first
        else:
            theme = next(tag.split(":")[1] for tag in builder.tags[t.artwork_id] if tag.startswith("theme:"))
            assert first.endswith(f"{LETTERS[t.index]}'s theme is {theme}"), (top, first)
    assert len(kinds) >= 3  # the tiny world exercises several kinds of evidence


def _first_choice_decision(builder, teacher, targets):
    """A logged decision whose largest evidence is a look the member played from, beside an alternative of another
    look."""
    for key, t in targets.items():
        top = contributions(teacher, t.example, t.index)[0]
        if key.startswith("unlogged") or not top.kind.startswith("choice:") or top.difference <= 0:
            continue
        family = top.kind.split(":", 1)[1]
        look = {k: next(tag for tag in builder.tags[a] if tag.startswith(family + ":"))
                for k, a in enumerate(t.example.candidates)}
        other = sorted({tag for tag in look.values() if tag != look[t.index]})
        if other:
            return key, look[t.index], other[0]
    raise AssertionError("no decision of the tiny world is led by a look")


def test_making_another_look_dominate_the_history_changes_the_rationale(all_pairs, world_copy):
    """The member also played, from every title that offered look W beside others, its W artwork: the target becomes a
    W artwork and the rationale says so, instead of the look it named before."""
    builder, teacher, targets = _fit(all_pairs)
    key, before, after = _first_choice_decision(builder, teacher, targets)
    t = targets[key]
    said = TasteVerbaliser(teacher, builder)(t.example, t.index)
    assert f"offered a {_look(before)} beside other looks, they played from it" in said

    table = pq.read_table(world_copy / "users.parquet")
    rows = table.to_pylist()
    history = next(r for r in rows if r["user_id"] == t.example.user_id)["history"]
    seen, ts = {e["title_id"] for e in history}, min(int(e["timestamp"]) for e in history)
    for tid, arts in sorted(builder.artworks_of.items()):
        with_look = [a for a in arts if after in builder.tags[a]]
        if tid in seen or tid == t.example.title_id or not with_look or len(with_look) == len(arts):
            continue
        ts -= 1000
        history.append({**history[0], "title_id": tid, "rating": 3, "artwork_id": with_look[0], "timestamp": ts})
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), world_copy / "users.parquet")

    from dataclasses import replace

    builder2, teacher2, targets2 = _fit(replace(all_pairs, data_dir=str(world_copy)))
    t2 = targets2[key]
    said2 = TasteVerbaliser(teacher2, builder2)(t2.example, t2.index)
    assert after in builder2.tags[t2.artwork_id]
    assert f"offered a {_look(after)} beside other looks, they played from it" in said2
    assert f"offered a {_look(before)}" not in said2
    assert said2.endswith(f"So {LETTERS[t2.index]}.")


def test_played_targets_without_a_teacher_are_the_played_artworks(all_pairs):
    from dataclasses import replace

    cfg = replace(all_pairs, sft=replace(all_pairs.sft, teacher="none", examples="played", max_examples=10))
    builder = ExampleBuilder(load_contract(cfg.data_dir), cfg.prompt)
    targets = sft_targets(cfg, builder)
    assert len(targets) == 10
    assert all(t.source == "played" and t.index == t.example.answer for t in targets)


def test_a_looks_counts_are_the_margin_the_prompts_summary_of_chosen_looks_shows(all_pairs):
    """'played from it (c by chance)' counts the same history as the prompt's 'Chose looks over the others: v +m'."""
    from dataclasses import replace

    cfg = replace(all_pairs, prompt=replace(all_pairs.prompt, history_summary=True, history_summary_looks="chosen"))
    builder, teacher, targets = _fit(cfg)
    verbalise = TasteVerbaliser(teacher, builder)
    checked = 0
    for t in targets.values():
        for tag in builder.tags[t.artwork_id]:
            offered, chosen, chance = verbalise._offered_and_chosen(t.example, tag)
            margin = round(chosen - chance)
            if margin > 0:
                assert f"{tag.split(':', 1)[1]} +{margin}" in builder.history_summary(t.example)
                checked += 1
    assert checked > 20
