"""One PNG per reviewed member: their recent history, then one row per title with every candidate.

Layout (top to bottom)::

    header    member id, split, wins/losses against production, the legend of marks
    history   most recent first: played-from artwork thumbnail, title name, genres, rating
    rows      per title: name, genres, outcome | candidate thumbnails in the model's order
              and, when the predictions carry one, the model's own rationale under the row
              (wrapped, at most RATIONALE_MAX_LINES lines, cut with '...')

Every candidate thumbnail sits inside three concentric rings, one per mark, always in the
same place: outer = the model's choice, middle = the oracle's choice (demo world), inner =
the played artwork (logged). A ring is drawn in its colour when the mark applies and left
blank otherwise, and a text label under the thumbnail repeats it, so the grid reads in
greyscale and for colour-blind reviewers too (the three colours also differ in lightness).
Text uses Pillow's built-in font (``ImageFont.load_default(size=...)``), sized to be read at
100% zoom; the demo world's 96x128 artworks are pasted at their native size.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mmart.review.select import MemberReview, TitleRow
from mmart.vision.images import ImageRefused, image_size, open_rgb


@dataclass(frozen=True)
class Mark:
    key: str
    label: str  # printed under the thumbnail
    meaning: str  # printed in the legend
    ring: int  # 0 = outermost
    frame: tuple[int, int, int]  # ring colour
    text: tuple[int, int, int]  # label colour: a darker shade, readable on white


# Blue, magenta and orange: far apart in hue, and dark / middle / light in greyscale (luma ~64, ~112, ~161).
MARKS = (
    Mark("model", "MODEL", "the model's choice (highest probability)", 0, (0, 70, 200), (0, 60, 180)),
    Mark("oracle", "ORACLE", "the oracle's choice (highest true play probability)", 1, (220, 40, 200), (165, 20, 150)),
    Mark("played", "PLAYED", "the member played the title from it (logged)", 2, (245, 150, 0), (165, 80, 0)),
)
MARK = {m.key: m for m in MARKS}

BG = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
RULE = (215, 215, 215)
TRACK = (228, 228, 228)
PLACEHOLDER = (236, 236, 236)

PAD = 16  # outer margin
RING = 4  # width of one mark ring
GAP = 2  # white gap between the thumbnail and the innermost ring
FRAME = GAP + RING * len(MARKS)  # frame width on each side of a thumbnail
CELL_PAD = 6  # horizontal space between candidate cells
LEFT_W = 250  # the title column of each row
LINE = 16  # height of one small text line
THUMB_H = 128
HISTORY_SCALE = 0.625  # history thumbnails: 60x80 for the demo world's 96x128
HISTORY_W = 124
HISTORY_MAX_LINES = 2
RATIONALE_MAX_LINES = 3  # the page carries the whole text; the grid only needs to show the gist
RATIONALE_LINE = 17
RATIONALE_LABEL = "Why (the model's words): "


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (needs FreeType; otherwise its fixed 11 px bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError):  # Pillow built without FreeType
        return ImageFont.load_default()


@dataclass
class GridLayout:
    """Where things landed, so tests (and anyone annotating the PNG) can find them."""

    size: tuple[int, int]
    thumbs: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)  # (title, artwork) -> box
    marks: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (title, artwork) -> mark keys
    history: list[tuple[int, int, int, int]] = field(default_factory=list)  # history thumbnail boxes
    rationales: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # title -> its rationale's box


def ring_box(thumb: tuple[int, int, int, int], ring: int) -> tuple[int, int, int, int]:
    """The outer box of mark ring ``ring`` (0 = outermost) around a thumbnail box; the ring is RING px wide."""
    off = FRAME - ring * RING
    x0, y0, x1, y1 = thumb
    return x0 - off, y0 - off, x1 + off, y1 + off


def thumb_size(paths: list[Path | None]) -> tuple[int, int]:
    """Thumbnail box for a catalog: 128 px high, as wide as the first readable artwork's aspect (64-228 px)."""
    for p in paths:
        if p is None:
            continue
        try:
            w, h = image_size(p)
        except ImageRefused:
            continue
        return max(64, min(228, round(THUMB_H * w / max(h, 1)))), THUMB_H
    return 96, THUMB_H


def load_thumb(path: Path | None, size: tuple[int, int]) -> Image.Image:
    """The artwork fitted into ``size`` (aspect kept, centred on grey); a labelled placeholder if unreadable.

    Opened through the cache's opener: a regular file within its byte and pixel limits, or a placeholder.
    """
    box = Image.new("RGB", size, PLACEHOLDER)
    try:
        if path is None:
            raise ImageRefused("-", "no path")
        im = ImageOps.contain(open_rgb(path), size)
    except ImageRefused:
        d = ImageDraw.Draw(box)
        d.text((size[0] // 2, size[1] // 2), "no image", font=font(12), fill=MUTED, anchor="mm")
        return box
    box.paste(im, ((size[0] - im.width) // 2, (size[1] - im.height) // 2))
    return box


_PUNCTUATION = str.maketrans({"\u2014": "-", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"',
                               "\u201d": '"', "\u2026": "...", "\u00a0": " ", "\u00d7": "x",
                               "\u00c6": "AE", "\u00e6": "ae", "\u00d8": "O", "\u00f8": "o", "\u00df": "ss",
                               "\u0152": "OE", "\u0153": "oe", "\u0141": "L", "\u0142": "l", "\u0111": "d"})


def ascii_text(text: str) -> str:
    """What the built-in font can draw: accents dropped (Amelie), other non-ASCII as '?'.

    Pillow's built-in font covers ASCII only; anything else would print as boxes. The HTML page
    carries the exact text.
    """
    text = unicodedata.normalize("NFKD", str(text).translate(_PUNCTUATION))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def _cap(width: float) -> int:
    """Characters that can matter for ``width`` px: every printable ASCII glyph is at least 1 px wide."""
    return max(0, int(width)) + 4


def fit(text: str, fnt, width: float) -> str:
    """``text`` (ASCII-folded) cut with '...' to fit ``width`` px.

    The text is first capped to what ``width`` could ever hold, then the cut point is found by
    binary search: O(log w) measurements of at most w characters, whatever the text's length
    (the one-character-at-a-time loop this replaces took seconds for a 3,000-character name).
    """
    text = ascii_text(text)
    cap = _cap(width)
    if len(text) <= cap and fnt.getlength(text) <= width:
        return text
    text = text[:cap]
    lo, hi = 0, len(text)  # the longest prefix that fits with '...' is in [lo, hi]; prefix lo is assumed to fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fnt.getlength(text[:mid] + "...") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..."


def wrap(text: str, fnt, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` px, at most ``max_lines`` (the last one cut with '...').

    Words are capped to what one line could hold (a longer word is cut on its line anyway),
    so every measurement is of at most about two lines' worth of characters.
    """
    cap = _cap(width)
    words = [w[:cap + 1] for w in ascii_text(text).split()]  # one past the cap: still cut with '...'
    lines: list[str] = []
    current, i = "", 0
    while i < len(words) and len(lines) < max_lines:
        trial = f"{current} {words[i]}" if current else words[i]
        if not current or fnt.getlength(trial) <= width:
            current = trial
            i += 1
        else:
            lines.append(current)
            current = ""
    if current and len(lines) < max_lines:
        lines.append(current)
    if i < len(words):
        lines[-1] = fit(lines[-1] + " " + " ".join(words[i:i + cap]), fnt, width)
    return [fit(s, fnt, width) for s in lines] or [""]  # a single over-long word is cut too


class _Canvas:
    def __init__(self, width: int, height: int):
        self.image = Image.new("RGB", (width, height), BG)
        self.draw = ImageDraw.Draw(self.image)

    def text(self, xy: tuple[float, float], s: str, size: int, fill=INK, width: float | None = None) -> None:
        f = font(size)
        self.draw.text(xy, fit(s, f, width) if width else ascii_text(s), font=f, fill=fill)

    def lines(self, x: float, y: float, lines: list[str], size: int, fill=INK, step: int | None = None) -> float:
        for s in lines:
            self.draw.text((x, y), ascii_text(s), font=font(size), fill=fill)
            y += step or size + 4
        return y


def _cell_marks(row: TitleRow, artwork_id: str) -> list[str]:
    keys = []
    if artwork_id == row.model_choice:
        keys.append("model")
    if artwork_id == row.oracle_choice:
        keys.append("oracle")
    if artwork_id == row.played:
        keys.append("played")
    return keys


@dataclass
class _Sizes:
    """Every size the grid's parts need, fixed before drawing (the canvas is sized once)."""
    thumb: tuple[int, int]
    hist_thumb: tuple[int, int]
    cell_w: int
    label_slots: list[str]
    hist_h: int
    row_heights: list[int]
    rationales: list[list[str]]  # per row, the wrapped rationale lines ([] without one)
    header_h: int
    width: int
    height: int


def _sizes(review: MemberReview, demo: bool, thumb: tuple[int, int]) -> _Sizes:
    rows = review.rows
    tw, th = thumb
    cell_w = tw + 2 * FRAME + 2 * CELL_PAD
    # Under each thumbnail: letter + probability, a bar, true p (demo), then one slot per mark and production.
    label_slots = ["model", "oracle", "played", "production"] if demo else ["model", "played"]
    cell_h = 2 * FRAME + th + 6 + 32 + (LINE if demo else 0) + LINE * len(label_slots) + 4
    k_max = max(len(r.candidates) for r in rows)
    hist_thumb = (round(tw * HISTORY_SCALE), round(th * HISTORY_SCALE))
    hist_h = 26 + hist_thumb[1] + 6 + HISTORY_MAX_LINES * 15 + 2 * LINE + 8 if review.history else 26 + LINE + 8
    header_h = 30 + 22 + 22 + (len(MARKS) if demo else 2) * 18 + 10
    width = 2 * PAD + max(LEFT_W + k_max * cell_w, len(review.history) * HISTORY_W, 760)
    rationales = [_rationale_lines(r, width - 2 * PAD) for r in rows]
    row_heights = [max(cell_h, _left_column_height(r, demo)) + 16 + _rationale_height(lines)
                   for r, lines in zip(rows, rationales)]
    height = PAD + header_h + hist_h + 10 + sum(row_heights) + PAD
    return _Sizes(thumb, hist_thumb, cell_w, label_slots, hist_h, row_heights, rationales, header_h, width, height)


def _rationale_lines(row: TitleRow, width: int) -> list[str]:
    """The labelled rationale wrapped to ``width``; none without a rationale, so such rows keep their height."""
    if not row.rationale:
        return []
    return wrap(RATIONALE_LABEL + row.rationale, font(13), width, RATIONALE_MAX_LINES)


def _rationale_height(lines: list[str]) -> int:
    return RATIONALE_LINE * len(lines) + 6 if lines else 0


def render_grid(review: MemberReview, split: str = "test", model_label: str = "model",
                thumb: tuple[int, int] | None = None) -> tuple[Image.Image, GridLayout]:
    """Draw one member's grid; returns the image and where each thumbnail and mark landed."""
    demo = any(r.oracle_choice is not None for r in review.rows)
    if thumb is None:
        thumb = thumb_size([c.image for r in review.rows for c in r.candidates])
    sz = _sizes(review, demo, thumb)
    c = _Canvas(sz.width, sz.height)
    layout = GridLayout(size=(sz.width, sz.height))
    y = _header(c, review, split, model_label, demo, PAD)
    y = _history_strip(c, layout, review, sz, y)
    for row, row_h, lines in zip(review.rows, sz.row_heights, sz.rationales):
        _title_row(c, layout, row, sz, demo, y)
        y += row_h
        _rationale(c, layout, row, lines, y)
    return c.image, layout


def _header(c: _Canvas, review: MemberReview, split: str, model_label: str, demo: bool, y: int) -> int:
    """Who, what, and the legend; returns the y below it."""
    width, rows = c.image.width, review.rows
    c.text((PAD, y), f"Member {review.user_id}", 22, width=width - 2 * PAD)
    y += 30
    summary = f"split {split} | {len(rows)} title{'s' * (len(rows) != 1)} reviewed | scores: {model_label}"
    c.text((PAD, y), summary, 14, MUTED, width=width - 2 * PAD)
    y += 22
    if demo:
        wins, losses, ties = (review.count(o) for o in ("win", "loss", "tie"))
        c.text((PAD, y), f"vs production (true play probability): {wins} win(s), {losses} loss(es), {ties} tie(s)",
               14, INK, width=width - 2 * PAD)
    else:
        c.text((PAD, y), "no oracle.parquet: true play probabilities and wins/losses are unknown (real data)",
               14, MUTED, width=width - 2 * PAD)
    y += 22
    for m in MARKS:
        if m.key == "oracle" and not demo:
            continue
        _swatch(c, PAD, y + 1, m)
        c.text((PAD + 22, y), f"{m.label}: {m.meaning}; {('outer', 'middle', 'inner')[m.ring]} frame", 13, m.text,
               width=width - 2 * PAD - 22)
        y += 18
    return y + 10


def _history_strip(c: _Canvas, layout: GridLayout, review: MemberReview, sz: _Sizes, y: int) -> int:
    """The member's recent history, most recent first; returns the y below it."""
    c.draw.line((PAD, y, sz.width - PAD, y), fill=RULE)
    y += 6
    hist_thumb = sz.hist_thumb
    if review.history:
        c.text((PAD, y), "History: most recent first, before these decisions", 14, INK)
        y += 26
        for i, h in enumerate(review.history):
            x = PAD + i * HISTORY_W
            box = (x, y, x + hist_thumb[0], y + hist_thumb[1])
            c.image.paste(load_thumb(h.image, hist_thumb) if h.image else _unknown(hist_thumb), box[:2])
            layout.history.append(box)
            ty = y + hist_thumb[1] + 6
            c.lines(x, ty, wrap(h.name, font(13), HISTORY_W - 8, HISTORY_MAX_LINES), 13, INK, 15)
            ty = y + hist_thumb[1] + 6 + HISTORY_MAX_LINES * 15
            c.text((x, ty), ", ".join(h.genres), 12, MUTED, width=HISTORY_W - 8)
            c.text((x, ty + LINE), f"rated {h.rating}/5" if h.rating is not None else "no rating", 12, MUTED)
        y += sz.hist_h - 26
    else:
        c.text((PAD, y), "History: none before these decisions", 14, MUTED)
        y += sz.hist_h
    return y + 10


def _title_row(c: _Canvas, layout: GridLayout, row: TitleRow, sz: _Sizes, demo: bool, y: int) -> None:
    """One reviewed title: its left column, then each candidate framed by its marks and labelled."""
    tw, th = sz.thumb
    c.draw.line((PAD, y, sz.width - PAD, y), fill=RULE)
    top = y + 10
    _left_column(c, row, PAD, top, demo)
    for j, cand in enumerate(row.candidates):
        x = PAD + LEFT_W + j * sz.cell_w + CELL_PAD
        tbox = (x + FRAME, top + FRAME, x + FRAME + tw, top + FRAME + th)
        c.image.paste(load_thumb(cand.image, sz.thumb), tbox[:2])
        c.draw.rectangle((tbox[0] - 1, tbox[1] - 1, tbox[2], tbox[3]), outline=RULE)  # edge of an unmarked card
        keys = _cell_marks(row, cand.artwork_id)
        for key in keys:
            m = MARK[key]
            x0, y0, x1, y1 = ring_box(tbox, m.ring)
            c.draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=m.frame, width=RING)
        layout.thumbs[(row.title_id, cand.artwork_id)] = tbox
        layout.marks[(row.title_id, cand.artwork_id)] = keys
        _cell_labels(c, row, cand, keys, x, top + 2 * FRAME + th + 6, tw + 2 * FRAME, sz.label_slots, demo)


def _rationale(c: _Canvas, layout: GridLayout, row: TitleRow, lines: list[str], row_bottom: int) -> None:
    """The model's rationale under its title's candidates, ending 10 px above the next row's rule."""
    if not lines:
        return
    y = row_bottom - RATIONALE_LINE * len(lines) - 10
    c.lines(PAD, y, lines, 13, INK, RATIONALE_LINE)
    layout.rationales[row.title_id] = (PAD, y, c.image.width - PAD, y + RATIONALE_LINE * len(lines))


def _swatch(c: _Canvas, x: int, y: int, m: Mark) -> None:
    c.draw.rectangle((x, y, x + 15, y + 11), outline=m.frame, width=RING)


def _unknown(size: tuple[int, int]) -> Image.Image:
    box = Image.new("RGB", size, PLACEHOLDER)
    d = ImageDraw.Draw(box)
    for i, s in enumerate(("artwork", "not logged")):
        d.text((size[0] // 2, size[1] // 2 - 8 + 16 * i), s, font=font(11), fill=MUTED, anchor="mm")
    return box


def _left_lines(row: TitleRow) -> tuple[list[str], list[str], str]:
    name = wrap(row.name, font(16), LEFT_W - 16, 3)
    genres = wrap(", ".join(row.genres), font(13), LEFT_W - 16, 2)
    meta = " | ".join(s for s in (str(row.year) if row.year else "", row.title_id) if s)
    return name, genres, meta


def _left_column_height(row: TitleRow, demo: bool) -> int:
    name, genres, _ = _left_lines(row)
    return 20 * len(name) + 17 * len(genres) + LINE + 8 + (24 + 3 * LINE if demo else 0)


def _left_column(c: _Canvas, row: TitleRow, x: int, y: int, demo: bool) -> None:
    name, genres, meta = _left_lines(row)
    y = c.lines(x, y, name, 16, INK, 20)
    y = c.lines(x, y, genres, 13, MUTED, 17)
    c.text((x, y), meta, 12, MUTED, width=LEFT_W - 16)
    y += LINE + 8
    if not demo:
        return
    outcome = row.outcome
    mine, prod, best = row.true_p(row.model_choice), row.true_p(row.production_choice), row.true_p(row.oracle_choice)
    head = {"win": "WIN vs production", "loss": "LOSS vs production", "tie": "TIE: same as production"}[outcome or "tie"]
    c.text((x, y), head + (f" ({(mine or 0) - (prod or 0):+.2f})" if outcome != "tie" else ""), 15, INK,
           width=LEFT_W - 16)
    y += 24
    for label, aid, p in (("model", row.model_choice, mine), ("production", row.production_choice, prod),
                          ("oracle", row.oracle_choice, best)):
        letter = row.candidate(aid).letter if row.candidate(aid) else "?"
        c.text((x, y), f"true p, {label} ({letter}): {p:.3f}", 12, MUTED, width=LEFT_W - 16)
        y += LINE


def _cell_labels(c: _Canvas, row: TitleRow, cand, keys: list[str], x: int, y: int, w: int,
                 slots: list[str], demo: bool) -> None:
    c.text((x, y), f"{cand.letter}  {100 * cand.prob:.1f}%", 16, INK, width=w)
    y += 22
    c.draw.rectangle((x, y, x + w - 1, y + 4), fill=TRACK)
    c.draw.rectangle((x, y, x + round((w - 1) * min(max(cand.prob, 0.0), 1.0)), y + 4), fill=MUTED)
    y += 10
    if demo:
        c.text((x, y), f"true p {cand.true_p:.3f}" if cand.true_p is not None else "", 12, MUTED, width=w)
        y += LINE
    labels: list[tuple[tuple[int, int, int] | None, str, tuple[int, int, int]]] = [
        (MARK[k].frame, MARK[k].label, MARK[k].text) for k in slots if k in keys]
    if "played" not in keys and cand.artwork_id in row.shown_no_play:
        labels.append((None, "shown, no play", MUTED))
    if "production" in slots and cand.artwork_id == row.production_choice:
        labels.append((None, "production's pick", MUTED))
    for swatch, text, colour in labels:  # top-aligned, always in the same order
        if swatch:
            c.draw.rectangle((x, y + 3, x + 8, y + 11), fill=swatch)
        c.text((x + 13, y), text, 13, colour, width=w - 13)
        y += LINE


def save_grid(review: MemberReview, path: Path, split: str = "test", model_label: str = "model",
              thumb: tuple[int, int] | None = None) -> GridLayout:
    image, layout = render_grid(review, split, model_label, thumb)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)  # not optimize=True: it tripled the time of a review on 2 cores for little gain
    return layout
