"""Qualitative review: per-member image grids (PNG) and one self-contained HTML page.

Run as: ``mmart review --preds preds.parquet --data DATASET --out DIR`` (or ``--model DIR``).
``select`` picks members and titles, ``grid`` draws the PNGs, ``page`` writes ``index.html``,
``build`` runs them in order, ``score`` scores only the reviewed pairs when given a model.
"""

from mmart.review.build import ReviewResult, run_review
from mmart.review.select import Filters

__all__ = ["Filters", "ReviewResult", "run_review"]
