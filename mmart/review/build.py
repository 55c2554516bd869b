"""Run a review: pick members, score them if needed, draw their grids, write ``index.html``.

Run as: ``mmart review --preds outputs/default/preds/dpo.parquet --data data/world --out outputs/default/review``
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmart.errors import UserError
from mmart.review.grid import GridLayout, save_grid, thumb_size
from mmart.review.page import GridFile, PageInfo, write_page
from mmart.review.select import (
    Filters,
    MemberReview,
    decision_pairs,
    filter_pairs,
    keep_outcome,
    load_predictions,
    member_reviews,
    oracle_path,
    pairs_of_predictions,
    require_oracle,
    rows_by_member,
    sample_members,
)

GRID_DIR = "grids"


@dataclass
class ReviewResult:
    index: Path
    reviews: list[MemberReview]
    grids: list[Path]
    layouts: list[GridLayout] = field(default_factory=list)


def safe_name(text: str) -> str:
    """A file-name-safe rendering of an id (real ids may hold anything)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40].strip(".") or "member"


def run_review(data_dir: str | Path, out_dir: str | Path, preds: str | Path | None = None,
               model_dir: str | Path | None = None, split: str = "test", members: int = 8, seed: int = 0,
               filters: Filters | None = None, titles_per_member: int = 6, history_items: int = 8,
               batch_size: int = 16, progress: bool = True) -> ReviewResult:
    """Review ``members`` sampled members of ``split``; scores come from ``preds`` or, without it, ``model_dir``."""
    from mmart.data.contract import load_contract

    start = time.perf_counter()
    filters = filters or Filters()
    if preds is None and model_dir is None:
        raise UserError("pass --preds FILE (from `mmart predict`) or --model DIR (a saved chooser) to review")
    if model_dir is not None:
        from mmart.review.score import check_model_dir

        check_model_dir(Path(model_dir))
    if filters.only is not None:
        require_oracle(data_dir, f"--only {filters.only} (the model's {filters.only} against production)")
    contract = load_contract(data_dir, check=False)

    chosen: list[str] | None = None  # members sampled before scoring (--model without --only)
    eligible = 0  # members matching every filter, before sampling
    if preds is not None:
        scored = filter_pairs(load_predictions(preds, split), contract, filters)
        source = str(preds) if model_dir is None else f"{preds} (model {model_dir})"
    else:
        from mmart.review.score import score_pairs

        universe = filter_pairs(decision_pairs(contract, split), contract, filters)
        if filters.only is None:  # score just the sampled members' pairs
            eligible = universe["user_id"].nunique()
            chosen = sample_members(universe["user_id"], members, seed)
            universe = universe[universe["user_id"].isin(chosen)]
        elif progress:
            print(f"[mmart review] --only {filters.only}: scoring all {len(universe)} matching pairs to find them "
                  "(pass --preds FILE to reuse a `mmart predict` output instead)")
        frame = score_pairs(model_dir, data_dir, split, set(zip(universe["user_id"], universe["title_id"])),
                            batch_size=batch_size, progress=progress)
        scored = pairs_of_predictions(frame, split, f"scores of {model_dir}")
        source = str(model_dir)
    rows_of = keep_outcome(rows_by_member(contract, scored, split), filters.only)
    if chosen is None:
        eligible = len(rows_of)
        chosen = sample_members(rows_of, members, seed)
    reviews = member_reviews(contract, rows_of, chosen, seed, titles_per_member, history_items)

    out = Path(out_dir)
    grid_dir = out / GRID_DIR
    grid_dir.mkdir(parents=True, exist_ok=True)
    for old in grid_dir.glob("*.png"):  # a rerun with other members must not leave stale grids behind
        old.unlink()
    # What the grids name as the source of the scores: the predictions file, or e.g. "dpo/model".
    label = Path(preds).name if preds is not None else "/".join(Path(model_dir).parts[-2:])
    thumb = thumb_size([c.image for r in reviews for row in r.rows for c in row.candidates][:50])
    files, paths, layouts = [], [], []
    for i, review in enumerate(reviews):
        rel = f"{GRID_DIR}/{i:03d}_{safe_name(review.user_id)}.png"
        layout = save_grid(review, out / rel, split, label, thumb)
        files.append(GridFile(review, rel, layout.size))
        paths.append(out / rel)
        layouts.append(layout)
    info = PageInfo(source=source, data_dir=str(data_dir), split=split, seed=seed, filters=filters,
                    eligible_members=eligible, demo=oracle_path(data_dir).is_file())
    index = write_page(out, files, info)
    if progress:
        n_rows = sum(len(r.rows) for r in reviews)
        print(f"[mmart review] {len(reviews)} members, {n_rows} titles in {time.perf_counter() - start:.1f}s -> {index}")
    return ReviewResult(index, reviews, paths, layouts)
