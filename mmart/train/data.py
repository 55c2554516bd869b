"""Examples -> tokenized rows (``datasets.Dataset``) for SFT, DPO and scoring.

Artwork ids become cache row indices here, once, so the training step only gathers
rows from the device-resident cache tensor.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

from mmart.errors import UserError
from mmart.examples import Example, ExampleBuilder, encode

RowsOf = Callable[[Sequence[str]], list[int]]


def cache_rows(cache) -> RowsOf:
    """Artwork ids -> cache rows, raising the cache's clear error for unknown or bad ids."""

    def rows_of(ids: Sequence[str]) -> list[int]:
        if not len(ids):
            return []
        if cache is None:
            raise UserError("the prompts carry artwork slots but no embedding cache was loaded; "
                            "build one with `mmart cache build` or set prompt.artwork_input=caption")
        return cache.rows(list(ids)).tolist()

    return rows_of


def subsample(examples: list[Example], n: int, seed: int, propensity_clip: float | None = None) -> list[Example]:
    """A seeded sample of ``n`` examples (all when n <= 0 or n >= len).

    With ``propensity_clip``, examples are drawn with probability proportional to
    min(1 / propensity, clip): importance resampling, so training on logs of a biased
    serving policy targets what members play, not what that policy liked to show.
    """
    if n <= 0 or n >= len(examples):
        return examples
    p = None
    if propensity_clip is not None:
        w = np.array([min(1.0 / (e.propensity or 1.0), propensity_clip) for e in examples])
        p = w / w.sum()
    pick = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False, p=p))
    return [examples[i] for i in pick]


def _encoded(builder: ExampleBuilder, examples: list[Example], tokenizer, desc: str):
    for ex in tqdm(examples, desc=desc, unit="ex", leave=False):
        yield ex, encode(builder, ex, tokenizer)


def sft_dataset(builder: ExampleBuilder, examples: list[Example], tokenizer, rows_of: RowsOf) -> Dataset:
    """Prompt + answer letter; loss on the letter only (labels -100 elsewhere)."""
    out = []
    for ex, enc in _encoded(builder, examples, tokenizer, "encode sft"):
        letter = enc["letter_ids"][enc["answer"]]
        out.append({
            "input_ids": enc["input_ids"] + [letter],
            "labels": [-100] * len(enc["input_ids"]) + [letter],
            "artwork_ids": rows_of(enc["artwork_ids"]),
            "propensity": ex.propensity if ex.propensity is not None else 1.0,
        })
    return Dataset.from_list(out)


def choice_dataset(builder: ExampleBuilder, examples: list[Example], tokenizer, rows_of: RowsOf) -> Dataset:
    """Multiple-choice rows for the fast DPO path and for scoring: prompt, letters, chosen, rejected."""
    out = []
    for ex, enc in _encoded(builder, examples, tokenizer, "encode choices"):
        out.append({
            "example_id": ex.example_id,
            "prompt_ids": enc["input_ids"],
            "letter_ids": enc["letter_ids"],
            "artwork_ids": rows_of(enc["artwork_ids"]),
            "chosen": -1 if ex.answer is None else ex.answer,
            "rejected": list(ex.rejected),
        })
    return Dataset.from_list(out)
