"""Teachers: the taste teacher reads members' looks from their history and chooses better than production."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from mmart.config import CONFIG_ROOT, load_config
from mmart.data.contract import load_contract
from mmart.data.world import WorldConfig, generate_world
from mmart.errors import UserError
from mmart.eval import policies as pol
from mmart.eval.reward_model import log_loss
from mmart.eval.teacher import TEACHERS, fit_teacher


@pytest.fixture(scope="module")
def mid_world(tmp_path_factory):
    """500 members with 8-20 history events each: enough evidence of taste to learn from, ~1 s to build."""
    cfg = replace(load_config(WorldConfig, CONFIG_ROOT / "world" / "tiny.yaml"), num_members=500, num_titles=60,
                  history_length=[8, 20], image_width=48, image_height=64)
    out = tmp_path_factory.mktemp("mid_world") / "world"
    generate_world(cfg, out, progress=False)
    contract = load_contract(out, check=False)
    imps = contract.frame("impressions")
    test = imps[imps.split == "test"]
    es = pol.eval_set(contract, "test", list(dict.fromkeys(zip(test.user_id, test.title_id))), out / "oracle.parquet")
    return contract, es


def _greedy_value(es, teacher) -> float:
    choice = pol.scores_policy(es, teacher.table(es.pairs.user_id, es.pairs.candidates, es.mask.shape[1]))
    return float((choice * es.p_play).sum(1).mean())


def test_taste_teacher_chooses_better_than_production_and_the_four_feature_model(mid_world):
    contract, es = mid_world
    value = lambda probs: float((probs * es.p_play).sum(1).mean())  # noqa: E731
    production, taste_oracle = value(pol.production_policy(es)), value(pol.taste_oracle_policy(es))
    taste = _greedy_value(es, fit_teacher(contract, "taste"))
    old = _greedy_value(es, fit_teacher(contract, "reward_model"))
    assert taste > old + 0.01
    assert (taste - production) / (taste_oracle - production) > 0.4  # measured 0.65 on this world


def test_taste_teacher_predicts_plays_better_than_the_four_feature_model(mid_world):
    contract, _ = mid_world
    imps = contract.frame("impressions")
    test = imps[imps.split == "test"]
    y = test.played.to_numpy(float)
    losses = {k: log_loss(fit_teacher(contract, k).predict(test.user_id, test.shown_artwork_id), y) for k in TEACHERS}
    assert losses["taste"] < losses["reward_model"]


def test_teacher_targets_for_sft_are_a_distribution(tiny_world):
    """SFT calls teacher_targets(teacher, example, T): every teacher kind plugs in unchanged."""
    from mmart.examples import ExampleBuilder, PromptConfig
    from mmart.train.data import teacher_targets

    contract = load_contract(tiny_world, check=False)
    ex = ExampleBuilder(contract, PromptConfig()).choice_examples("train")[0]
    for kind in TEACHERS:
        p = np.array(teacher_targets(fit_teacher(contract, kind), ex, 0.25))
        assert p.shape == (len(ex.candidates),) and np.isclose(p.sum(), 1.0) and (p > 0).all()


def test_members_without_history_and_catalogs_without_tags(world_copy):
    users = pd.read_parquet(world_copy / "users.parquet")
    users.loc[0, "history"] = []
    users.to_parquet(world_copy / "users.parquet", index=False)
    contract = load_contract(world_copy, check=False)
    teacher = fit_teacher(contract, "taste")
    arts = contract.frame("artworks").artwork_id[:3].tolist()
    q = teacher.predict([users.user_id[0], "not-a-member", users.user_id[1]], arts)
    assert ((q > 0) & (q < 1)).all()
    with pytest.raises(UserError, match="not-an-artwork"):
        teacher.predict([users.user_id[1]], ["not-an-artwork"])

    pd.read_parquet(world_copy / "artworks.parquet").drop(columns=["tags"]).to_parquet(world_copy / "artworks.parquet")
    untagged = fit_teacher(load_contract(world_copy, check=False), "taste")
    assert np.isfinite(untagged.predict([users.user_id[1]] * 3, arts)).all()


def test_unknown_teacher_is_a_user_error(tiny_world):
    with pytest.raises(UserError, match="unknown teacher 'nope'; choose one of reward_model, taste"):
        fit_teacher(load_contract(tiny_world, check=False), "nope")
