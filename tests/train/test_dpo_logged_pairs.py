"""``dpo.pairs: logged``, recomputed from the impressions table alone: one decision per played train impression,
chosen = the played artwork, rejected = the artworks shown to that member for that title without a play (every
other candidate when there is none), down to the batch DPO's fast trainer reads."""

from __future__ import annotations

import pandas as pd
import pytest

from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
from mmart.examples import PromptEncoder
from mmart.model.packing import collate_rows
from mmart.model.testing import tiny_tokenizer
from mmart.train.common import load_inputs
from mmart.train.data import cache_rows, decision_rows
from mmart.train.dpo import dpo_examples


@pytest.fixture(scope="module")
def logged(tiny_world, tmp_path_factory) -> PipelineConfig:
    """The smoke recipe with logged pairs, on captions (no cache to build: the pairs do not depend on it)."""
    return load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [
        f"data_dir={tiny_world}", f"output_dir={tmp_path_factory.mktemp('run')}", "dpo.pairs=logged",
        "prompt.artwork_input=caption"])


def expected_pairs(data_dir) -> dict[str, tuple[str, frozenset[str], str]]:
    """impression_id of each played train impression -> (played artwork, rejected artworks, which rule gave them)."""
    imps = pd.read_parquet(f"{data_dir}/impressions.parquet")
    arts = pd.read_parquet(f"{data_dir}/artworks.parquet")
    artworks_of = arts.groupby("title_id").artwork_id.agg(frozenset).to_dict()
    train = imps[imps.split == "train"]
    skipped = train[~train.played].groupby(["user_id", "title_id"]).shown_artwork_id.agg(frozenset).to_dict()
    out = {}
    for p in train[train.played].itertuples():
        shown = skipped.get((p.user_id, p.title_id), frozenset()) - {p.shown_artwork_id}
        rule = "shown" if shown else "others"
        out[p.impression_id] = (p.shown_artwork_id, shown or artworks_of[p.title_id] - {p.shown_artwork_id}, rule)
    return out


def _labels(ex) -> tuple[str, frozenset[str]]:
    return ex.candidates[ex.answer], frozenset(ex.candidates[k] for k in ex.rejected)


def test_every_played_train_impression_is_a_decision_with_the_logged_rejections(logged):
    want = expected_pairs(logged.data_dir)
    builder = load_inputs(logged).builder
    got = builder.preference_examples("train")
    assert len({ex.example_id for ex in got}) == len(got)
    assert {ex.example_id: _labels(ex) for ex in got} == {i: (c, r) for i, (c, r, _) in want.items()}
    for ex in got:
        assert sorted(ex.candidates) == sorted(builder.artworks_of[ex.title_id])
        assert len(set(ex.rejected)) == len(ex.rejected) and ex.answer not in ex.rejected
    # the tiny world has both kinds, and a played artwork also shown without a play before (never rejected)
    rules = [rule for _, _, rule in want.values()]
    assert rules.count("shown") > 0 and rules.count("others") > 0
    imps = pd.read_parquet(f"{logged.data_dir}/impressions.parquet")
    train = imps[imps.split == "train"]
    unplayed = set(zip(train.user_id[~train.played], train.title_id[~train.played],
                       train.shown_artwork_id[~train.played]))
    assert any((p.user_id, p.title_id, p.shown_artwork_id) in unplayed for p in train[train.played].itertuples())


def test_dpos_draw_and_its_batch_carry_those_pairs(logged):
    """What `mmart dpo` trains on: its drawn decisions keep their labels through packing and collation."""
    want = expected_pairs(logged.data_dir)
    inputs = load_inputs(logged)
    examples = dpo_examples(logged, inputs)
    assert len(examples) == logged.dpo.max_examples
    assert all(_labels(ex) == want[ex.example_id][:2] for ex in examples)

    rows = decision_rows(PromptEncoder(inputs.builder, tiny_tokenizer()), examples, cache_rows(None),
                         logged.dpo.pack_titles)
    assert any(len(r["example_id"]) > 1 for r in rows)  # packed: several titles behind one prefix
    batch = collate_rows(list(rows), pad_token_id=0)
    seen = 0
    for i, row in enumerate(rows):
        for j, eid in enumerate(row["example_id"]):
            ex = examples[row["decision_index"][j]]
            assert ex.example_id == eid
            played, rejected, _ = want[eid]
            assert ex.candidates[int(batch["chosen"][i, j])] == played
            assert {ex.candidates[k] for k in batch["rejected_mask"][i, j].nonzero().flatten().tolist()} == rejected
            seen += 1
    assert seen == len(examples)
