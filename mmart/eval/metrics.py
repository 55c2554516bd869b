"""Metrics of one policy on an EvalSet, each with a bootstrap interval over member-title pairs."""

from __future__ import annotations

import numpy as np

from mmart.data.contract import UNIFORM_POLICY
from mmart.eval import ope
from mmart.eval.bootstrap import Estimate, bootstrap
from mmart.eval.policies import EvalSet


def _expected_rr(scores: np.ndarray, mask: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """Reciprocal rank of the shown artwork, ties broken uniformly at random (in expectation)."""
    s = np.where(mask, scores, -np.inf)
    mine = s[np.arange(len(s)), shown][:, None]
    greater = (s > mine).sum(1)
    ties = (s == mine).sum(1)  # includes the shown artwork itself
    return np.array([np.mean(1.0 / np.arange(g + 1, g + t + 1)) for g, t in zip(greater, ties)])


def policy_metrics(es: EvalSet, probs: np.ndarray, n_boot: int = 1000, seed: int = 0,
                   q_hat: np.ndarray | None = None) -> dict[str, dict]:
    """Hit rate and MRR per logging slice, IPS / SNIPS / DR on first impressions, true value."""
    imps = es.impressions
    out: dict[str, dict] = {}
    played = imps[imps.played.astype(bool)]
    for name, rows in (("uniform", played[played.logging_policy == UNIFORM_POLICY]),
                       ("production", played[played.logging_policy != UNIFORM_POLICY])):
        if not len(rows):
            continue
        pairs, shown = rows.pair.to_numpy(), rows.shown.to_numpy()
        hit = probs[pairs, shown]
        rr = _expected_rr(probs[pairs], es.mask[pairs], shown)
        out[f"hit_rate_{name}"] = {**bootstrap(lambda i: hit[i].mean(), pairs, n_boot, seed=seed).as_dict(), "n": len(rows)}
        out[f"mrr_{name}"] = {**bootstrap(lambda i: rr[i].mean(), pairs, n_boot, seed=seed).as_dict(), "n": len(rows)}

    if es.p_play is not None:
        # The same hit rate in expectation over the plays, from the demo world's play model: every uniformly
        # logged impression (played or not) weighted by its shown artwork's true play probability. It ranks
        # policies as the realized hit rate does, without the noise of a few dozen plays.
        uni = imps[imps.logging_policy == UNIFORM_POLICY]
        if len(uni):
            pairs, shown = uni.pair.to_numpy(), uni.shown.to_numpy()
            weight, hit = es.p_play[pairs, shown], probs[pairs, shown]
            out["hit_rate_uniform_expected"] = {
                **bootstrap(lambda i: (hit[i] * weight[i]).sum() / weight[i].sum(), pairs, n_boot, seed=seed).as_dict(),
                "n": len(uni)}

    # Off-policy values on each pair's first impression: the policy's decision, before any stopping.
    first = imps[imps["first"]]
    pairs, shown = first.pair.to_numpy(), first.shown.to_numpy()
    r, p = first.played.to_numpy(float), first.propensity.to_numpy(float)
    pi = probs[pairs, shown]
    out["ips"] = {**bootstrap(lambda i: ope.ips(r[i], p[i], pi[i]), pairs, n_boot, seed=seed).as_dict(), "n": len(first)}
    out["snips"] = {**bootstrap(lambda i: ope.snips(r[i], p[i], pi[i]), pairs, n_boot, seed=seed).as_dict(), "n": len(first)}
    if q_hat is not None:
        q_logged = q_hat[pairs, shown]
        q_target = (probs[pairs] * q_hat[pairs]).sum(1)
        out["dr"] = {**bootstrap(lambda i: ope.dr(r[i], p[i], pi[i], q_logged[i], q_target[i]), pairs, n_boot,
                                 seed=seed).as_dict(), "n": len(first)}
    out["ess"] = {"value": ope.effective_sample_size(p, pi), "n": len(first)}
    if es.p_play is not None:
        v = (probs * es.p_play).sum(1)
        out["true_value"] = {**bootstrap(lambda i: v[i].mean(), np.arange(es.size), n_boot, seed=seed).as_dict(),
                             "n": es.size}
    return out


def relative_to(es: EvalSet, probs: np.ndarray, base: np.ndarray, top: np.ndarray | None,
                n_boot: int = 1000, seed: int = 0, taste_top: np.ndarray | None = None,
                rows: np.ndarray | None = None) -> dict[str, dict]:
    """Lift over ``base`` and share of the (top - base) gap closed, by true value (paired bootstrap).

    ``top`` is the oracle, ``taste_top`` the taste oracle (the reachable ceiling: ``gap_closed_taste``);
    ``rows`` restricts everything to those pairs (a slice).
    """
    if es.p_play is None:
        return {}
    rows = np.arange(es.size) if rows is None else np.asarray(rows)
    v, b = (probs * es.p_play).sum(1)[rows], (base * es.p_play).sum(1)[rows]
    idx = np.arange(len(rows))  # the bootstrap hands the statistic positions in this array
    out = {"lift": bootstrap(lambda i: (v[i].mean() - b[i].mean()) / b[i].mean(), idx, n_boot, seed=seed).as_dict()}
    for key, ceiling in (("gap_closed", top), ("gap_closed_taste", taste_top)):
        if ceiling is not None:
            t = (ceiling * es.p_play).sum(1)[rows]
            out[key] = bootstrap(lambda i: (v[i].mean() - b[i].mean()) / max(t[i].mean() - b[i].mean(), 1e-12),
                                 idx, n_boot, seed=seed).as_dict()
    return out


def true_value(es: EvalSet, probs: np.ndarray, rows: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """The exact expected play rate over ``rows`` (demo world), with its bootstrap interval."""
    v = (probs * es.p_play).sum(1)[rows]
    return {**bootstrap(lambda i: v[i].mean(), np.arange(len(rows)), n_boot, seed=seed).as_dict(), "n": len(rows)}


def per_pair_values(es: EvalSet, probs: np.ndarray, q_hat: np.ndarray | None) -> tuple[str, np.ndarray, np.ndarray]:
    """Each evaluated pair's contribution to the policy's value, and the pair ids it belongs to.

    On the demo world, the exact expected play (true value); elsewhere the DR term of each pair's first
    logged impression (needs ``q_hat``). Means of these over the same pairs are what paired comparisons
    compare.
    """
    if es.p_play is not None:
        return "true_value", (probs * es.p_play).sum(1), np.arange(es.size)
    if q_hat is None:
        raise ValueError("per-pair values need the world's oracle or a reward model")
    first = es.impressions[es.impressions["first"]]
    pairs, shown = first.pair.to_numpy(), first.shown.to_numpy()
    r, p = first.played.to_numpy(float), first.propensity.to_numpy(float)
    pi = probs[pairs, shown]
    return "dr", (probs[pairs] * q_hat[pairs]).sum(1) + pi / p * (r - q_hat[pairs, shown]), pairs


def paired_difference(es: EvalSet, a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      q_hat: np.ndarray | None = None) -> dict:
    """V(a) - V(b) and (V(a) - V(b)) / V(b) over the same pairs, resampled together: what decides a design."""
    metric, va, groups = per_pair_values(es, a, q_hat)
    _, vb, _ = per_pair_values(es, b, q_hat)
    diff = bootstrap(lambda i: va[i].mean() - vb[i].mean(), groups, n_boot, seed=seed).as_dict()
    lift = bootstrap(lambda i: (va[i].mean() - vb[i].mean()) / max(vb[i].mean(), 1e-12), groups, n_boot,
                     seed=seed).as_dict()
    return {"metric": metric, "a": float(va.mean()), "b": float(vb.mean()), "difference": diff, "lift": lift,
            "verdict": verdict(diff), "pairs": int(len(np.unique(groups)))}


def verdict(est: dict) -> str:
    """'better' / 'worse' when the 95% interval excludes 0, else 'no evidence'."""
    return "no evidence" if est["low"] <= 0 <= est["high"] else ("better" if est["value"] > 0 else "worse")


__all__ = ["Estimate", "paired_difference", "per_pair_values", "policy_metrics", "relative_to", "true_value", "verdict"]
