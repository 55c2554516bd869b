"""Fabricated ``mmart predict`` output for a generated world: the review stage needs no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def fabricate_predictions(world: Path, split: str = "test", seed: int = 0) -> pd.DataFrame:
    """``mmart predict``-shaped rows (one per impression) with random candidate orders and probabilities."""
    rng = np.random.default_rng(seed)
    arts = pd.read_parquet(world / "artworks.parquet").groupby("title_id").artwork_id.agg(list).to_dict()
    imps = pd.read_parquet(world / "impressions.parquet")
    imps = imps[imps.split == split]
    per_pair = {}
    for key in imps[["user_id", "title_id"]].drop_duplicates().itertuples(index=False):
        cands = list(rng.permutation(arts[key.title_id]))
        per_pair[tuple(key)] = (cands, rng.dirichlet(np.ones(len(cands))).tolist())
    rows = []
    for r in imps.itertuples(index=False):
        cands, p = per_pair[(r.user_id, r.title_id)]
        best = int(np.argmax(p))
        rows.append({
            "impression_id": r.impression_id, "user_id": r.user_id, "title_id": r.title_id,
            "candidates": cands, "probs": p, "choice": cands[best], "choice_prob": p[best],
            "shown_artwork_id": r.shown_artwork_id, "shown_prob": p[cands.index(r.shown_artwork_id)],
            "played": bool(r.played), "propensity": float(r.propensity), "split": r.split,
            "logging_policy": r.logging_policy,
        })
    return pd.DataFrame(rows)
