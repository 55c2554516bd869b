"""Review survives bad artworks and names (issue 12: items 6, 8, 9, 10).

Bombs past the pixel limit, a FIFO named ``.png`` and a path with a NUL byte become
placeholders (the cache's limits, through the one shared opener); a 10,000-character name
is fitted with a bounded amount of measuring.
"""

from __future__ import annotations

import os
import signal
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmart.review import Filters, run_review
from mmart.review.grid import PLACEHOLDER, fit, font, wrap


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A 1-bit greyscale PNG. With ``rows`` None only the header is real (a bomb that cannot be decoded);
    otherwise every row is ``rows`` (one filter byte + packed pixels), so the file decodes in full."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" if rows is None else rows * height, 6)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Hung(BaseException):
    """Not an Exception: code that catches OSError (or everything) around an open() cannot swallow it."""


@pytest.fixture
def no_hang():
    """Fail (instead of blocking forever) if the code under test blocks, e.g. opening a FIFO with no writer."""
    def _raise(*_):
        signal.alarm(5)  # again, in case something swallowed this one
        raise Hung("blocked for 30 s (opened a FIFO?)")
    before = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("fault", ["bomb-30000", "image-10000", "fifo", "nul-byte"])
def test_bad_artwork_becomes_a_placeholder(fault, world_copy, tiny_preds, tmp_path, no_hang):
    preds = pd.read_parquet(tiny_preds).drop_duplicates(["user_id", "title_id"])
    member = preds.user_id.iloc[0]
    aid = str(preds[preds.user_id == member].candidates.iloc[0][0])
    arts = pd.read_parquet(world_copy / "artworks.parquet")
    image = world_copy / dict(zip(arts.artwork_id, arts.path))[aid]
    if fault == "bomb-30000":  # past twice the limit: Pillow's own guard raises on open
        image.write_bytes(_png(30000, 30000))
    elif fault == "image-10000":  # a real, white, 100 MP image: past the limit, must not be decoded
        image.write_bytes(_png(10000, 10000, b"\0" + b"\xff" * 1250))
    elif fault == "fifo":
        image.unlink()
        os.mkfifo(image)
    else:
        arts.loc[arts.artwork_id == aid, "path"] = "images/a\x00b.png"
        arts.to_parquet(world_copy / "artworks.parquet", index=False)

    result = run_review(world_copy, tmp_path / "r", preds=tiny_preds, filters=Filters(member=member), members=0,
                        titles_per_member=0, progress=False)
    (i,) = [i for i, r in enumerate(result.reviews) if r.user_id == member]
    img = np.asarray(Image.open(result.grids[i]).convert("RGB"))
    (x0, y0, x1, y1), = [box for (_, a), box in result.layouts[i].thumbs.items() if a == aid]
    assert tuple(img[y0 + 3, x0 + 3]) == PLACEHOLDER  # a placeholder, not the (white) decoded pixels


class CountingFont:
    """A font that counts the characters it is asked to measure and refuses past a budget (no timing)."""

    def __init__(self, size: int, budget: int):
        self.font, self.budget, self.measured, self.calls = font(size), budget, 0, 0

    def getlength(self, text: str) -> float:
        self.calls += 1
        self.measured += len(text)
        if self.measured > self.budget:
            raise AssertionError(f"measured {self.measured} characters in {self.calls} calls: super-linear fitting")
        return self.font.getlength(text)


def test_a_10000_character_name_is_fitted_with_bounded_measuring():
    name = "Lorem ipsum dolor " * 555 + "x" * 10  # 10,000 characters, many words
    word = "Supercalifragilistic" * 500  # 10,000 characters, one word
    for text in (name, word):
        f = CountingFont(16, budget=20_000)
        cut = fit(text, f, 234)
        assert cut.endswith("...") and f.font.getlength(cut) <= 234 and f.calls <= 40
        f = CountingFont(16, budget=20_000)
        lines = wrap(text, f, 234, 3)
        assert 1 <= len(lines) <= 3 and lines[-1].endswith("...") and f.calls <= 200
        assert all(f.font.getlength(line) <= 234 for line in lines)


def naive_fit(text: str, fnt, width: float) -> str:
    """The reference: drop one character at a time until the text and '...' fit (quadratic, fine for short text)."""
    if fnt.getlength(text) <= width:
        return text
    while text and fnt.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


@pytest.mark.parametrize("width", [0, 20, 120, 234])
def test_fit_cuts_where_measuring_every_prefix_would(width):
    f = font(16)
    for text in ("The Quiet Harbour of Many Long Evenings Together Again", "WWWWWWWWWWWWWWWWWWWWWWWWWWWWWW",
                 "iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii", "Up", ""):
        assert fit(text, f, width) == naive_fit(text, f, width), (text, width)
