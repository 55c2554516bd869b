"""Policies scored on the same member-title pairs: (member, title, candidates) -> probabilities.

Every policy is an array ``probs [P, K]`` over the evaluated pairs' candidates in one
canonical order (the catalog's artwork order per title; -inf/0 padding past a title's
own K is masked), so all metrics are computed by the same code for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mmart.data.contract import Contract
from mmart.errors import UserError
from mmart.eval.reward_model import smoothed_rate

BASELINE = "production"  # the logging policy every scored model is compared against (the report's lifts)


@dataclass
class EvalSet:
    """The evaluated pairs and their logged impressions, with the ground truth when the world has one."""

    pairs: pd.DataFrame  # pair, user_id, title_id, candidates (canonical order)
    mask: np.ndarray  # [P, K] True on real candidates
    impressions: pd.DataFrame  # pair, shown (index), played, propensity, logging_policy, first (bool)
    p_play: np.ndarray | None  # [P, K] true play probability (demo world), else None
    production_prob: np.ndarray | None  # [P, K] the logging model's distribution (demo world), else None
    p_taste: np.ndarray | None = None  # [P, K] play probability without the unlearnable noise (demo world)
    new_title: np.ndarray | None = None  # [P] the pair's title is in no training decision (see new_titles)

    @property
    def size(self) -> int:
        return len(self.pairs)


def eval_set(contract: Contract, split: str, pairs: list[tuple[str, str]], oracle_path: Path | None) -> EvalSet:
    """Build the evaluation set for ``pairs`` (user_id, title_id) of ``split``."""
    arts = contract.frame("artworks")
    cands_of = arts.groupby("title_id", sort=False).artwork_id.agg(list).to_dict()
    k = max(len(v) for v in cands_of.values())
    frame = pd.DataFrame(pairs, columns=["user_id", "title_id"]).drop_duplicates().reset_index(drop=True)
    frame["pair"] = np.arange(len(frame))
    frame["candidates"] = [cands_of[t] for t in frame.title_id]
    mask = np.zeros((len(frame), k), dtype=bool)
    for i, c in enumerate(frame.candidates):
        mask[i, : len(c)] = True

    imps = contract.frame("impressions")
    imps = imps[imps.split == split].merge(frame[["user_id", "title_id", "pair"]], on=["user_id", "title_id"])
    imps = imps.sort_values(["pair", "timestamp", "impression_id"]).reset_index(drop=True)
    pos = {(p, a): j for p, c in zip(frame.pair, frame.candidates) for j, a in enumerate(c)}
    imps["shown"] = [pos[(p, a)] for p, a in zip(imps.pair, imps.shown_artwork_id)]
    imps["first"] = ~imps.pair.duplicated()
    if "logging_policy" not in imps:
        imps["logging_policy"] = "production"

    p_play = prod = taste = None
    if oracle_path is not None and Path(oracle_path).is_file():
        oracle = pd.read_parquet(oracle_path)
        oracle = oracle.merge(frame[["user_id", "title_id", "pair"]], on=["user_id", "title_id"])
        p_play, prod = np.zeros(mask.shape), np.zeros(mask.shape)
        j = np.array([pos[(p, a)] for p, a in zip(oracle.pair, oracle.artwork_id)])
        p_play[oracle.pair.to_numpy(), j] = oracle.p_play.to_numpy()
        prod[oracle.pair.to_numpy(), j] = oracle.production_prob.to_numpy()
        if "p_taste" in oracle:  # worlds generated before the taste oracle lack it
            taste = np.zeros(mask.shape)
            taste[oracle.pair.to_numpy(), j] = oracle.p_taste.to_numpy()
        if (p_play[mask] == 0).any():
            raise UserError(f"{oracle_path} lacks some evaluated candidates; regenerate the world")
    unseen = new_titles(contract)
    return EvalSet(frame, mask, imps, p_play, prod, taste, frame.title_id.isin(unseen).to_numpy())


def new_titles(contract: Contract) -> set[str]:
    """Titles in no training decision: no train impression, and in no member's history (so in no train prompt).

    Choosing their artworks is choosing among artworks the model has never been trained on.
    """
    imps = contract.frame("impressions")
    seen = set(imps.title_id[imps.split == "train"])
    for history in contract.frame("users").history:
        seen.update(ev["title_id"] for ev in (history if history is not None else []))
    return set(contract.frame("titles").title_id) - seen


def _one_hot_argmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    s = np.where(mask, scores, -np.inf)
    out = np.zeros(s.shape)
    out[np.arange(len(s)), s.argmax(1)] = 1.0
    return out


def random_policy(es: EvalSet) -> np.ndarray:
    return es.mask / es.mask.sum(1, keepdims=True)


def oracle_policy(es: EvalSet) -> np.ndarray:
    if es.p_play is None:
        raise UserError("the oracle policy needs oracle.parquet (demo world only)")
    return _one_hot_argmax(es.p_play, es.mask)


def taste_oracle_policy(es: EvalSet) -> np.ndarray:
    """The best choice for the member's true tastes, without the per member-artwork noise no model can learn."""
    if es.p_taste is None:
        raise UserError("the taste oracle needs oracle.parquet with p_taste: regenerate the world with `mmart world`")
    return _one_hot_argmax(es.p_taste, es.mask)


def scores_policy(es: EvalSet, scores: np.ndarray) -> np.ndarray:
    """The greedy choice of any scorer given as ``[P, K]`` scores over the canonical candidates."""
    return _one_hot_argmax(scores, es.mask)


def production_policy(es: EvalSet) -> np.ndarray:
    """The logging model's greedy choice (demo world: its distribution is in oracle.parquet)."""
    if es.production_prob is None:
        raise UserError("the production policy's choices need oracle.parquet; on real data its value is the logged play rate")
    return _one_hot_argmax(es.production_prob, es.mask)


def artwork_play_rates(contract: Contract) -> dict[str, float]:
    """Smoothed train play rate of each artwork when shown: (plays + 1) / (shows + 2)."""
    imps = contract.frame("impressions")
    return smoothed_rate(imps[imps.split == "train"], "shown_artwork_id", prior=0.5)


def popularity_policy(es: EvalSet, rates: dict[str, float]) -> np.ndarray:
    """One size fits all: per title, the artwork with the highest train play rate."""
    scores = np.full(es.mask.shape, -np.inf)
    for i, cands in enumerate(es.pairs.candidates):
        scores[i, : len(cands)] = [rates.get(a, 0.5) for a in cands]
    return _one_hot_argmax(scores, es.mask)


def model_policy(es: EvalSet, preds: pd.DataFrame, greedy: bool = True, name: str = "model") -> np.ndarray:
    """A scored model (``mmart predict`` output): its argmax choice (or its distribution)."""
    first = preds.drop_duplicates(["user_id", "title_id"]).set_index(["user_id", "title_id"])
    probs = np.zeros(es.mask.shape)
    missing = []
    for i, (u, t, cands) in enumerate(zip(es.pairs.user_id, es.pairs.title_id, es.pairs.candidates)):
        if (u, t) not in first.index:
            missing.append((u, t))
            continue
        row = first.loc[(u, t)]
        p = dict(zip(row.candidates, row.probs))
        if set(p) != set(cands):
            raise UserError(f"predictions {name!r} score candidates {sorted(p)} for ({u}, {t}), the dataset has "
                            f"{sorted(cands)}: score this dataset with `mmart predict`")
        probs[i, : len(cands)] = [p[a] for a in cands]
    if missing:
        raise UserError(f"predictions {name!r} lack {len(missing)} evaluated pairs, e.g. {missing[:3]}; "
                        "score the same pairs (same split and --max-pairs) for every model")
    return _one_hot_argmax(probs, es.mask) if greedy else probs / probs.sum(1, keepdims=True)
