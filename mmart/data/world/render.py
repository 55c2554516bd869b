"""Artwork rendering with Pillow only: background palette, theme motif, shot, tone, title text.

Each artwork's look is a pure function of its attributes and its own seed, so the
world is byte-identical for a seed and any one artwork can be re-rendered alone.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmart.data.world.themes import THEMES


@dataclass(frozen=True)
class ArtworkSpec:
    """Everything that decides an artwork's pixels."""

    theme: str
    closeup: bool  # one big face vs a group of small figures
    bright: bool  # bright vs dark tone
    large_title: bool
    title: str
    seed: int


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's built-in font (no files, no network); scalable when FreeType is present.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _heart(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill) -> None:
    d.ellipse([x - r, y - r, x, y], fill=fill)
    d.ellipse([x, y - r, x + r, y], fill=fill)
    d.polygon([(x - r, y - r / 2), (x + r, y - r / 2), (x, y + r)], fill=fill)


def _burst(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill, rng: np.random.Generator) -> None:
    n = int(rng.integers(7, 11))
    phase = rng.uniform(0, math.pi)
    pts = []
    for i in range(2 * n):
        rad = r if i % 2 == 0 else r * 0.45
        a = phase + math.pi * i / n
        pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
    d.polygon(pts, fill=fill)


def _motif(d: ImageDraw.ImageDraw, motif: str, w: int, h: int, color, rng: np.random.Generator) -> None:
    """Scatter the theme's motif over the background."""
    if motif == "hearts":
        for _ in range(int(rng.integers(5, 9))):
            _heart(d, rng.uniform(8, w - 8), rng.uniform(8, h * 0.8), rng.uniform(5, 10), color)
    elif motif == "bursts":
        for _ in range(int(rng.integers(3, 6))):
            _burst(d, rng.uniform(8, w - 8), rng.uniform(8, h * 0.8), rng.uniform(9, 17), color, rng)
    elif motif == "bubbles":
        for _ in range(int(rng.integers(7, 12))):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h * 0.85), rng.uniform(3, 9)
            d.ellipse([x - r, y - r, x + r, y + r], outline=color, width=2)
    elif motif == "silhouettes":
        base = h * 0.82
        for _ in range(int(rng.integers(4, 7))):  # jagged dead trees
            x, top, half = rng.uniform(0, w), rng.uniform(h * 0.15, h * 0.5), rng.uniform(4, 9)
            d.polygon([(x - half, base), (x + half, base), (x, top)], fill=color)
            d.line([(x, top + 10), (x + rng.choice([-1, 1]) * 12, top + rng.uniform(0, 10))], fill=color, width=2)
    elif motif == "suns":
        for _ in range(int(rng.integers(1, 3))):
            x, y, r = rng.uniform(12, w - 12), rng.uniform(10, h * 0.4), rng.uniform(7, 12)
            d.ellipse([x - r, y - r, x + r, y + r], fill=color)
            for k in range(10):
                a = 2 * math.pi * k / 10
                d.line([(x + 1.4 * r * math.cos(a), y + 1.4 * r * math.sin(a)),
                        (x + 2.0 * r * math.cos(a), y + 2.0 * r * math.sin(a))], fill=color, width=2)
    elif motif == "grids":
        step = int(rng.integers(9, 14))
        off = int(rng.integers(0, step))
        for x in range(off, w, step):
            d.line([(x, 0), (x, h)], fill=color, width=1)
        for y in range(off, h, step):
            d.line([(0, y), (w, y)], fill=color, width=1)
    elif motif == "rain":
        for _ in range(int(rng.integers(28, 40))):
            x, y = rng.uniform(-10, w), rng.uniform(0, h * 0.85)
            d.line([(x, y), (x + 4, y + 10)], fill=color, width=1)
    elif motif == "frames":
        for _ in range(int(rng.integers(2, 4))):
            x0, y0 = rng.uniform(2, w * 0.4), rng.uniform(2, h * 0.4)
            x1, y1 = rng.uniform(w * 0.6, w - 2), rng.uniform(h * 0.55, h * 0.85)
            d.rectangle([x0, y0, x1, y1], outline=color, width=2)
    else:
        raise ValueError(f"unknown motif {motif!r}")


def _figure(d: ImageDraw.ImageDraw, cx: float, top: float, scale: float, skin, cloth) -> None:
    """A head and shoulders; scale ~1 is a close-up face, ~0.3 a person in a group."""
    hr = 22 * scale
    d.rounded_rectangle([cx - 2.1 * hr, top + 1.7 * hr, cx + 2.1 * hr, top + 4.5 * hr], radius=hr, fill=cloth)
    d.ellipse([cx - hr, top, cx + hr, top + 2.2 * hr], fill=skin)
    if scale > 0.6:  # a face close enough to show features
        ey = top + 0.95 * hr
        for ex in (cx - 0.4 * hr, cx + 0.4 * hr):
            d.ellipse([ex - 0.12 * hr, ey - 0.1 * hr, ex + 0.12 * hr, ey + 0.1 * hr], fill=(30, 20, 20))
        d.arc([cx - 0.4 * hr, top + 1.2 * hr, cx + 0.4 * hr, top + 1.7 * hr], 20, 160, fill=(90, 30, 30), width=2)


def render_artwork(spec: ArtworkSpec, width: int, height: int) -> Image.Image:
    """Draw one artwork (RGB) from its spec."""
    theme = THEMES[spec.theme]
    rng = np.random.default_rng(spec.seed)
    hue = rng.uniform(*theme.hue)
    sat = theme.saturation * rng.uniform(0.85, 1.1)
    value = rng.uniform(0.78, 0.95) if spec.bright else rng.uniform(0.22, 0.38)

    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    # Vertical gradient in the theme's hue; tone sets its brightness.
    for y in range(0, height, 4):
        v = value * (1.0 - 0.25 * y / height)
        d.rectangle([0, y, width, y + 4], fill=_rgb(hue + 4 * y / height, sat, v))
    motif_v = value * 0.55 if spec.bright else min(1.0, value * 2.2)
    _motif(d, theme.motif, width, height, _rgb(hue + 180 * (theme.motif == "suns") + 15, sat * 0.9, motif_v), rng)

    skin = _rgb(rng.uniform(15, 35), rng.uniform(0.3, 0.6), rng.uniform(0.55, 0.95) if spec.bright else rng.uniform(0.45, 0.7))
    if spec.closeup:
        _figure(d, width / 2 + rng.uniform(-6, 6), height * 0.18 + rng.uniform(-4, 4), 1.0 + rng.uniform(-0.08, 0.08),
                skin, _rgb(hue + 160, 0.5, value * 0.7))
    else:
        n = int(rng.integers(3, 6))
        for i in range(n):
            cx = width * (i + 0.5) / n + rng.uniform(-3, 3)
            skin_i = _rgb(rng.uniform(15, 35), rng.uniform(0.3, 0.6), rng.uniform(0.5, 0.9))
            _figure(d, cx, height * 0.42 + rng.uniform(-6, 6), 0.32 + rng.uniform(-0.04, 0.04),
                    skin_i, _rgb(hue + rng.uniform(120, 240), 0.5, value * 0.8))

    # Title band at the bottom.
    size = 15 if spec.large_title else 8
    font = _font(size)
    text = spec.title if spec.large_title else spec.title.upper()
    band_top = height - (26 if spec.large_title else 14)
    d.rectangle([0, band_top, width, height], fill=_rgb(hue, sat * 0.6, value * 0.35))
    words, lines = text.split(), [""]
    for w in words:  # wrap to the artwork's width
        trial = (lines[-1] + " " + w).strip()
        if lines[-1] and d.textlength(trial, font=font) > width - 4:
            lines.append(w)
        else:
            lines[-1] = trial
    d.text((3, band_top + 1), lines[0], fill=(245, 245, 235), font=font)
    return img


def contact_sheet(images: list[Image.Image], labels: list[str], columns: int, cell: tuple[int, int]) -> Image.Image:
    """A labelled grid of artworks for a person to eyeball the world."""
    cw, ch = cell
    label_h = 24
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (cw + 8) + 8, rows * (ch + label_h + 8) + 8), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    font = _font(9)
    for i, (im, label) in enumerate(zip(images, labels)):
        x = 8 + (i % columns) * (cw + 8)
        y = 8 + (i // columns) * (ch + label_h + 8)
        sheet.paste(im.resize((cw, ch)), (x, y))
        for j, line in enumerate(label.split("\n")[:2]):
            d.text((x, y + ch + 2 + 11 * j), line, fill=(20, 20, 20), font=font)
    return sheet
