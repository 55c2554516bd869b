"""The model's own rationale (the predictions' optional ``rationale`` column) under each reviewed title.

On the page it is escaped text in a row under its title's row, labelled as the model's words; in the
grid a few wrapped lines under the title's row. Without the column, or with only blank values, the
page and the grids are byte for byte what they are without rationales.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmart.review import Filters, run_review
from mmart.review.grid import BG

from fake_preds import fabricate_predictions, with_rationales

PAYLOAD = "<script>alert(1)</script><img src=x onerror=alert(1)>"
LABEL = "Why (the model's words):"
PAGE_TAGS = {"html", "head", "meta", "title", "link", "style", "body", "header", "h1", "h2", "dl", "dt", "dd", "p",
             "ul", "li", "b", "span", "nav", "ol", "a", "main", "section", "table", "thead", "tbody", "tr", "th",
             "td", "br", "div", "img"}


class Page(HTMLParser):
    """Every tag name, and the text of each table row (character references decoded)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.rows: list[str] = []
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(" ".join("".join(self._row).split()))
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self._row.append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


@pytest.fixture(scope="module")
def preds(tiny_world) -> pd.DataFrame:
    return fabricate_predictions(tiny_world)


@pytest.fixture(scope="module")
def member(preds) -> tuple[str, list[str]]:
    """The member with the most scored titles (at least 3), and those titles."""
    pairs = preds.drop_duplicates(["user_id", "title_id"])
    user = pairs.user_id.value_counts().index[0]
    titles = list(pairs[pairs.user_id == user].title_id)
    assert len(titles) >= 3
    return user, titles


def review(world, preds: pd.DataFrame, path, out, **kwargs):
    preds.to_parquet(path, index=False)
    return run_review(world, out, preds=path, titles_per_member=0, progress=False, **kwargs)


def test_rationale_is_shown_escaped_under_its_title(tiny_world, preds, member, tmp_path):
    user, (t_evil, t_plain, t_none, *_) = member
    plain = 'Close-up faces & "drama" fans: she plays those, so B.'
    texts = {(user, t_evil): PAYLOAD, (user, t_plain): plain, (user, t_none): None}
    res = review(tiny_world, with_rationales(preds, texts), tmp_path / "p.parquet", tmp_path / "out",
                 filters=Filters(member=user))
    page = res.index.read_text()

    assert html.escape(PAYLOAD) in page and html.escape(plain) in page
    assert "<script" not in page.lower() and "<img src=x" not in page
    doc = parse(page)
    assert doc.tags <= PAGE_TAGS, "the rationale made no element of its own"
    # Each rationale is the row right under its title's row, labelled; a pair without one gets no such row.
    names = {row.title_id: row.name for row in res.reviews[0].rows}
    for title, text in ((t_evil, PAYLOAD), (t_plain, plain)):
        i = next(i for i, r in enumerate(doc.rows) if r.startswith(" ".join(names[title].split())))
        assert doc.rows[i + 1] == f"{LABEL} {text}"
    assert page.count(LABEL) == 2


def test_blank_rationales_change_nothing(tiny_world, preds, tmp_path):
    """A model that wrote no rationale (no column, or None/NaN/blank in it) gets the page and grids of today."""
    path = tmp_path / "p.parquet"  # one path for both runs: the page names it
    without = review(tiny_world, preds, path, tmp_path / "without", members=4, seed=1)
    blanks = [None, np.nan, "", "   "]
    keys = preds[["user_id", "title_id"]].drop_duplicates().itertuples(index=False, name=None)
    blank = with_rationales(preds, {k: blanks[i % len(blanks)] for i, k in enumerate(keys)})
    with_blank = review(tiny_world, blank, path, tmp_path / "blank", members=4, seed=1)

    assert with_blank.index.read_bytes() == without.index.read_bytes()
    assert LABEL not in with_blank.index.read_text()
    assert len(with_blank.grids) == len(without.grids) == 4
    for a, b in zip(with_blank.grids, without.grids):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_grid_shows_rationales_in_a_few_lines_under_their_rows(tiny_world, preds, member, tmp_path):
    user, titles = member
    short = {(user, t): f"She likes {t}." for t in titles}
    huge = {(user, t): " ".join(["because"] * 20_000) for t in titles}
    runs = {name: review(tiny_world, with_rationales(preds, texts), tmp_path / f"{name}.parquet",
                         tmp_path / name, filters=Filters(member=user))
            for name, texts in (("none", {}), ("short", short), ("huge", huge))}
    sizes = {}
    for name, res in runs.items():
        with Image.open(res.grids[0]) as im:
            assert im.size == res.layouts[0].size
            sizes[name] = im.size
    (w0, h0), (w1, h1), (w2, h2) = sizes["none"], sizes["short"], sizes["huge"]
    assert w0 == w1 == w2 and h0 < h1 < h2
    assert h2 - h1 <= len(titles) * 3 * 20, "a long rationale is cut to a few lines, not drawn whole"

    res = runs["huge"]
    layout, rows = res.layouts[0], res.reviews[0].rows
    img = np.asarray(Image.open(res.grids[0]).convert("RGB"))
    for k, row in enumerate(rows):
        x0, y0, x1, y1 = layout.rationales[row.title_id]
        assert (img[y0:y1, x0:x1] != BG).any(), f"no text drawn for {row.title_id}'s rationale"
        thumbs = [b for (t, _), b in layout.thumbs.items() if t == row.title_id]
        assert y0 > max(b[3] for b in thumbs), "under the title's candidates"
        if k + 1 < len(rows):
            assert y1 < min(b[1] for (t, _), b in layout.thumbs.items() if t == rows[k + 1].title_id)
    assert not runs["none"].layouts[0].rationales
