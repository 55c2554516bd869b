"""Fabricated ``mmart predict`` output for a generated world: the review stage needs no model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from mmart.predict import predictions_frame


def fabricate_predictions(world: Path, split: str = "test", seed: int = 0) -> pd.DataFrame:
    """``mmart predict``-shaped rows (one per impression) with random candidate orders and probabilities."""
    rng = np.random.default_rng(seed)
    arts = pd.read_parquet(world / "artworks.parquet").groupby("title_id").artwork_id.agg(list).to_dict()
    imps = pd.read_parquet(world / "impressions.parquet")
    imps = imps[imps.split == split]
    examples, probs = [], []
    for key in imps[["user_id", "title_id"]].drop_duplicates().itertuples(index=False):
        cands = list(rng.permutation(arts[key.title_id]))
        examples.append(SimpleNamespace(user_id=key.user_id, title_id=key.title_id, candidates=cands))
        probs.append(rng.dirichlet(np.ones(len(cands))))
    return predictions_frame(examples, probs, imps)  # the same rows `mmart predict` writes


def with_rationales(preds: pd.DataFrame, texts: dict[tuple[str, str], object]) -> pd.DataFrame:
    """``preds`` with the optional ``rationale`` column: ``texts[(user_id, title_id)]`` on every impression row of
    the pair, None for pairs not in ``texts`` (a model that wrote none)."""
    out = preds.copy()
    out["rationale"] = [texts.get(key) for key in zip(out.user_id, out.title_id)]
    return out
