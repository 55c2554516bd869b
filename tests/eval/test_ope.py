"""Estimators on hand-computed cases, their input validation, and bootstrap coverage."""

from __future__ import annotations

import numpy as np
import pytest

from mmart.errors import UserError
from mmart.eval.bootstrap import bootstrap
from mmart.eval.ope import dr, effective_sample_size, ips, snips

R = [1, 0, 1, 0]
P = [0.5, 0.25, 0.25, 1.0]
PI = [1.0, 0.0, 0.5, 0.5]


def test_ips_by_hand():
    # weights 2, 0, 2, 0.5 -> r*w = 2, 0, 2, 0 -> mean 1.0
    assert ips(R, P, PI) == pytest.approx(1.0)
    assert ips(R, P, PI, clip=1.5) == pytest.approx((1.5 + 1.5) / 4)


def test_snips_by_hand():
    assert snips(R, P, PI) == pytest.approx(4.0 / 4.5)


def test_snips_without_overlap_cannot_be_estimated():
    """The policy never takes a logged action: the logs say nothing about it (NaN, as obp), not 0.0."""
    assert np.isnan(snips([1, 1], [0.5, 0.5], [0, 0]))
    assert ips([1, 1], [0.5, 0.5], [0, 0]) == 0.0  # IPS is defined (and biased) here
    # Bootstrapping it gives an interval that says so too, and does not crash.
    est = bootstrap(lambda i: snips(np.ones(4)[i], np.full(4, 0.5)[i], np.zeros(4)[i]), np.arange(4), n_boot=20)
    assert np.isnan([est.value, est.low, est.high]).all()


def test_dr_by_hand():
    q_logged = [0.5, 0.5, 0.5, 0.5]
    q_target = [0.6, 0.4, 0.5, 0.5]
    # q_t + w*(r - q_l): 0.6+2*0.5, 0.4+0, 0.5+2*0.5, 0.5+0.5*(-0.5)
    expected = np.mean([1.6, 0.4, 1.5, 0.25])
    assert dr(R, P, PI, q_logged, q_target) == pytest.approx(expected)


def test_dr_with_perfect_model_has_no_correction():
    assert dr([1, 0], [0.5, 0.5], [1, 1], [1, 0], [0.7, 0.2]) == pytest.approx(0.45)


def test_logging_policy_ips_is_its_play_rate():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 1, 500)
    r = rng.random(500) < 0.3
    assert ips(r, p, p) == pytest.approx(r.mean())


def test_ess():
    assert effective_sample_size([0.5] * 4, [0.5] * 4) == pytest.approx(4)
    assert effective_sample_size([0.5, 0.5], [1.0, 0.0]) == pytest.approx(1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reward=[1, 0], propensity=[0.5], target_prob=[1, 1]), "equal lengths"),
    (dict(reward=[1, 0], propensity=[0.5, 0.0], target_prob=[1, 1]), r"propensity must be in \(0, 1\]; index 1"),
    (dict(reward=[1, 0], propensity=[0.5, 1.2], target_prob=[1, 1]), "propensity must be in"),
    (dict(reward=[1, 0], propensity=[0.5, 0.5], target_prob=[1, 1.5]), r"target_prob must be in \[0, 1\]"),
    (dict(reward=[1, float("nan")], propensity=[0.5, 0.5], target_prob=[1, 1]), "reward contains NaN at index 1"),
    (dict(reward=[1, float("inf")], propensity=[0.5, 0.5], target_prob=[1, 1]), "reward contains inf at index 1"),
    (dict(reward=[-float("inf"), 0], propensity=[0.5, 0.5], target_prob=[1, 1]), "reward contains -inf at index 0"),
    (dict(reward=[1, 0], propensity=[0.5, 0.5], target_prob=[1, 1], clip=-1.0), "clip must be a positive number"),
    (dict(reward=[1, 0], propensity=[0.5, 0.5], target_prob=[1, 1], clip=0), "clip must be a positive number"),
    (dict(reward=[1, 0], propensity=[0.5, 0.5], target_prob=[1, 1], clip=float("nan")), "clip must be"),
    (dict(reward=[], propensity=[], target_prob=[]), "empty"),
    (dict(reward=[[1]], propensity=[[0.5]], target_prob=[[1]]), "1-D"),
])
def test_validation(kwargs, match):
    for fn in (ips, snips):
        with pytest.raises(UserError, match=match):
            fn(**kwargs)


def test_dr_refuses_infinite_model_predictions_and_negative_clip():
    with pytest.raises(UserError, match="q_target contains inf at index 0"):
        dr([1, 0], [0.5, 0.5], [1, 1], [0.5, 0.5], [float("inf"), 0.5])
    with pytest.raises(UserError, match="clip must be a positive number"):
        dr([1, 0], [0.5, 0.5], [1, 1], [0.5, 0.5], [0.5, 0.5], clip=-0.5)
    with pytest.raises(UserError, match="clip must be a positive number"):
        effective_sample_size([0.5, 0.5], [1, 1], clip=-2)


def test_bootstrap_coverage_on_a_known_mean():
    """A 95% interval for a mean covers the truth in roughly 95% of repeated experiments."""
    rng = np.random.default_rng(1)
    truth, hits, trials = 0.3, 0, 200
    for t in range(trials):
        x = (rng.random(200) < truth).astype(float)
        est = bootstrap(lambda idx: x[idx].mean(), np.arange(200), n_boot=300, seed=t)
        hits += est.low <= truth <= est.high
    assert 0.89 <= hits / trials <= 0.99


def test_bootstrap_keeps_groups_together():
    # Two groups with constant values: any resample mean is one of 0, 0.5, 1 weighted by group size.
    x = np.array([0.0, 0.0, 0.0, 1.0])
    groups = np.array([0, 0, 0, 1])
    est = bootstrap(lambda idx: x[idx].mean(), groups, n_boot=200)
    assert est.value == pytest.approx(0.25)
    assert set(np.round([est.low, est.high], 6)) <= {0.0, 0.25, 0.5, 1.0}
