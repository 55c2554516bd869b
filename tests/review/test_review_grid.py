"""Grids for the tiny world: size, every candidate drawn, and each mark's frame on the right thumbnail.

The expected marks are recomputed here from the inputs (fabricated probabilities, oracle.parquet,
impressions), not read back from the renderer, and checked by reading pixel colours.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmart.review import run_review
from mmart.review.grid import BG, CELL_PAD, FRAME, LEFT_W, MARKS, PAD, RING, ascii_text, ring_box


@pytest.fixture(scope="module")
def review(tiny_world, tiny_preds, tmp_path_factory):
    out = tmp_path_factory.mktemp("review_all")
    # Every test member and every title: the whole tiny world's test split in one go.
    return run_review(tiny_world, out, preds=tiny_preds, members=0, titles_per_member=0, progress=False)


def expected_marks(world, preds_path) -> dict[tuple[str, str, str], set[str]]:
    """(user, title, artwork) -> marks, from the inputs alone."""
    preds = pd.read_parquet(preds_path).drop_duplicates(["user_id", "title_id"])
    oracle = pd.read_parquet(world / "oracle.parquet")
    imps = pd.read_parquet(world / "impressions.parquet")
    out: dict[tuple[str, str, str], set[str]] = {}
    for r in preds.itertuples(index=False):
        for a in r.candidates:
            out[(r.user_id, r.title_id, a)] = set()
        out[(r.user_id, r.title_id, r.candidates[int(np.argmax(r.probs))])].add("model")
    best = oracle.loc[oracle.groupby(["user_id", "title_id"]).p_play.idxmax()]
    for r in best.itertuples(index=False):
        if (r.user_id, r.title_id, r.artwork_id) in out:
            out[(r.user_id, r.title_id, r.artwork_id)].add("oracle")
    for r in imps[imps.played & (imps.split == "test")].itertuples(index=False):
        out[(r.user_id, r.title_id, r.shown_artwork_id)].add("played")
    return out


def ring_pixels(img: np.ndarray, thumb: tuple[int, int, int, int], ring: int) -> list[tuple[int, ...]]:
    """The colour at the middle of each side of a ring (half a ring width in from its outer edge)."""
    x0, y0, x1, y1 = ring_box(thumb, ring)
    h = RING // 2
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    return [tuple(img[y, x]) for x, y in ((xm, y0 + h), (xm, y1 - 1 - h), (x0 + h, ym), (x1 - 1 - h, ym))]


def test_one_grid_per_member_with_every_scored_pair(review, tiny_preds):
    preds = pd.read_parquet(tiny_preds)
    assert [r.user_id for r in review.reviews] == sorted(preds.user_id.unique())
    shown = {(r.user_id, row.title_id) for r in review.reviews for row in r.rows}
    assert shown == set(zip(preds.user_id, preds.title_id))
    assert all(p.is_file() for p in review.grids)


def test_grid_size(review):
    for path, layout, rev in zip(review.grids, review.layouts, review.reviews):
        with Image.open(path) as im:
            assert im.size == layout.size
        w, h = layout.size
        k = max(len(row.candidates) for row in rev.rows)
        assert w >= 2 * PAD + LEFT_W + k * (96 + 2 * FRAME + 2 * CELL_PAD)
        assert w <= 1400, "a grid should fit a laptop screen at 100% zoom"
        # Header + history + one band of at least a framed thumbnail per title row.
        assert h >= len(rev.rows) * (128 + 2 * FRAME) + 200
        for box in layout.thumbs.values():
            assert (box[2] - box[0], box[3] - box[1]) == (96, 128), "the demo world's artworks at native size"
            assert 0 <= box[0] and box[2] <= w and 0 <= box[1] and box[3] <= h


def test_every_candidate_is_drawn_pixel_for_pixel(review):
    n = 0
    for path, layout, rev in zip(review.grids, review.layouts, review.reviews):
        img = np.asarray(Image.open(path).convert("RGB"))
        for row in rev.rows:
            for cand in row.candidates:
                x0, y0, x1, y1 = layout.thumbs[(row.title_id, cand.artwork_id)]
                art = np.asarray(Image.open(cand.image).convert("RGB"))
                np.testing.assert_array_equal(img[y0:y1, x0:x1], art, err_msg=f"{rev.user_id} {cand.artwork_id}")
                n += 1
    assert n == sum(len(row.candidates) for rev in review.reviews for row in rev.rows) > 50


def test_marks_land_on_the_right_thumbnails(review, tiny_world, tiny_preds):
    want = expected_marks(tiny_world, tiny_preds)
    seen = {m.key: 0 for m in MARKS}
    for path, layout, rev in zip(review.grids, review.layouts, review.reviews):
        img = np.asarray(Image.open(path).convert("RGB"))
        for row in rev.rows:
            for cand in row.candidates:
                marks = want[(rev.user_id, row.title_id, cand.artwork_id)]
                thumb = layout.thumbs[(row.title_id, cand.artwork_id)]
                for m in MARKS:
                    colours = ring_pixels(img, thumb, m.ring)
                    expected = m.frame if m.key in marks else BG
                    assert colours == [expected] * 4, (rev.user_id, row.title_id, cand.artwork_id, m.key, colours)
                    seen[m.key] += m.key in marks
    # Not vacuous: every kind of mark occurs, the model's once per title row.
    assert seen["model"] == sum(len(r.rows) for r in review.reviews)
    assert seen["oracle"] == seen["model"] and seen["played"] > 0


def test_mark_colours_are_far_apart_in_colour_and_in_greyscale():
    frames = [np.array(m.frame, dtype=float) for m in MARKS]
    luma = [float(f @ [0.299, 0.587, 0.114]) for f in frames]
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            assert np.linalg.norm(frames[i] - frames[j]) > 150
            assert abs(luma[i] - luma[j]) > 35


def test_history_strip_shows_played_from_artworks(review):
    for path, layout, rev in zip(review.grids, review.layouts, review.reviews):
        assert len(layout.history) == len(rev.history) <= 8
        img = np.asarray(Image.open(path).convert("RGB")).astype(int)
        for box, item in zip(layout.history, rev.history):
            if item.image is None:
                continue
            x0, y0, x1, y1 = box
            art = np.asarray(Image.open(item.image).convert("RGB").resize((x1 - x0, y1 - y0))).astype(int)
            assert np.abs(img[y0:y1, x0:x1] - art).mean() < 12, (rev.user_id, item.artwork_id)
        stamps = [h.timestamp for h in rev.history]
        assert stamps == sorted(stamps, reverse=True)
        assert all(t < min(r.timestamp for r in rev.rows) for t in stamps), "no history from after the decisions"


def test_text_the_built_in_font_cannot_draw_is_folded_not_boxed():
    assert ascii_text("Amélie — Ærø’s “café”… Łódź") == "Amelie - AEro's \"cafe\"... Lodz"
    assert ascii_text("東京 🎬") == "?? ?"
