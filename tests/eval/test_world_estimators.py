"""The estimators on a world large enough to matter (the default preset, ~2,000 test pairs, seconds to build).

Off-policy estimates of fixed policies must land within their intervals of the exact value
the world knows, and the DR reward model must predict plays better than a constant.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmart.config import CONFIG_ROOT, load_config
from mmart.data.contract import load_contract
from mmart.data.world import WorldConfig, generate_world
from mmart.eval import ope
from mmart.eval import policies as pol
from mmart.eval.metrics import policy_metrics
from mmart.eval.reward_model import fit_logistic, fit_reward_model, log_loss
from mmart.eval.teacher import TEACHERS, fit_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("default_world") / "world"
    generate_world(load_config(WorldConfig, CONFIG_ROOT / "world" / "default.yaml"), out, progress=False)
    contract = load_contract(out, check=False)
    imps = contract.frame("impressions")
    test = imps[imps.split == "test"]
    es = pol.eval_set(contract, "test", list(dict.fromkeys(zip(test.user_id, test.title_id))), out / "oracle.parquet")
    return contract, es


@pytest.mark.parametrize("reward_model", TEACHERS)
def test_ips_snips_dr_cover_the_true_value_of_fixed_policies(world, reward_model):
    contract, es = world
    assert es.size > 1500
    q = fit_teacher(contract, reward_model).table(es.pairs.user_id, es.pairs.candidates, es.mask.shape[1])
    fixed = {"random": pol.random_policy(es), "production": pol.production_policy(es),
             "popularity": pol.popularity_policy(es, pol.artwork_play_rates(contract))}
    for name, probs in fixed.items():
        m = policy_metrics(es, probs, n_boot=300, seed=0, q_hat=q)
        truth = m["true_value"]["value"]
        for est in ("ips", "snips", "dr"):
            lo, hi = m[est]["low"], m[est]["high"]
            assert lo <= truth <= hi, f"{name} {est}: [{lo:.3f}, {hi:.3f}] misses the true value {truth:.3f}"
        # The reward model earns its place: DR's interval is no wider than IPS's.
        assert m["dr"]["high"] - m["dr"]["low"] <= m["ips"]["high"] - m["ips"]["low"]


def test_expected_uniform_hit_rate_agrees_with_the_realized_one_and_ranks_policies(world):
    """The expected hit rate (uniform impressions weighted by true play probability) is what the realized hit rate
    estimates: it lies in the realized one's interval, and it orders random < production < oracle."""
    _, es = world
    expected = {}
    for name, probs in {"random": pol.random_policy(es), "production": pol.production_policy(es),
                        "oracle": pol.oracle_policy(es)}.items():
        m = policy_metrics(es, probs, n_boot=300, seed=0)
        realized, exp = m["hit_rate_uniform"], m["hit_rate_uniform_expected"]
        assert realized["low"] <= exp["value"] <= realized["high"], name
        assert exp["n"] > realized["n"]  # every uniform impression, not only the played ones
        expected[name] = exp["value"]
    assert expected["random"] == pytest.approx(0.25, abs=1e-9)  # 4 candidates everywhere in this world
    assert expected["random"] < expected["production"] < expected["oracle"]


def test_ips_of_the_logging_policy_is_its_logged_play_rate(world):
    _, es = world
    first = es.impressions[es.impressions["first"]]
    p = first.propensity.to_numpy(float)
    r = first.played.to_numpy(float)
    assert ope.ips(r, p, p) == pytest.approx(r.mean(), abs=1e-12)


def test_reward_model_beats_a_constant_on_test(world):
    contract, _ = world
    rm = fit_reward_model(contract, "train")
    imps = contract.frame("impressions")
    test = imps[imps.split == "test"]
    y = test.played.to_numpy(float)
    p = rm.predict(test.user_id, test.shown_artwork_id)
    assert log_loss(p, y) < log_loss(np.full(len(y), rm.prior), y) - 0.02


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 3))
    w = np.array([1.5, -2.0, 0.5, -0.3])  # intercept last
    y = (rng.random(20000) < 1 / (1 + np.exp(-(x @ w[:3] + w[3])))).astype(float)
    np.testing.assert_allclose(fit_logistic(x, y, l2=0.0), w, atol=0.08)
