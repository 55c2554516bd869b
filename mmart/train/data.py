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


def sft_dataset(builder: ExampleBuilder, examples: list[Example], tokenizer, rows_of: RowsOf,
                teacher=None, teacher_temperature: float = 1.0) -> Dataset:
    """letter: prompt + answer letter, loss on the letter only (labels -100 elsewhere), TRL's own loss.
    per_candidate: the prompt with each candidate's score position; the loss is a softmax over the K
    candidates' scores (``ArtworkSFTTrainer.compute_loss``)."""
    if builder.cfg.answer == "per_candidate":
        return _per_candidate_sft(builder, examples, tokenizer, rows_of, teacher, teacher_temperature)
    if teacher is not None:
        raise UserError("sft.teacher needs prompt.answer=per_candidate (its loss is over the candidates)")
    out = []
    for ex, enc in _encoded(builder, examples, tokenizer, "encode sft"):
        letter = enc["answer_ids"][enc["answer"]]
        out.append({
            "input_ids": enc["input_ids"] + [letter],
            "labels": [-100] * len(enc["input_ids"]) + [letter],
            "artwork_ids": rows_of(enc["artwork_ids"]),
            "propensity": ex.propensity if ex.propensity is not None else 1.0,
        })
    return Dataset.from_list(out)


def teacher_targets(teacher, ex: Example, temperature: float = 1.0) -> list[float]:
    """The teacher's choice distribution over the candidates: ``softmax(logit(q_k) / T)``.

    ``q_k`` is the teacher's P(play | candidate k). A small T keeps the teacher's ranking and
    drops its (nearly flat) probability scale: for a chooser, the ranking is what is learned.
    """
    q = np.clip(teacher.predict([ex.user_id] * len(ex.candidates), ex.candidates), 1e-6, 1 - 1e-6)
    z = (np.log(q) - np.log1p(-q)) / temperature
    p = np.exp(z - z.max())
    return (p / p.sum()).tolist()


def _per_candidate_sft(builder, examples, tokenizer, rows_of, teacher=None, temperature: float = 1.0) -> Dataset:
    """The choice rows, named as TRL's collator expects (labels unused: the loss is over candidates)."""
    rows = choice_dataset(builder, examples, tokenizer, rows_of).remove_columns(["example_id", "rejected"])
    rows = rows.rename_column("prompt_ids", "input_ids")
    rows = rows.add_column("labels", [[-100] * len(ids) for ids in rows["input_ids"]])
    if teacher is not None:
        rows = rows.add_column("target_probs", [teacher_targets(teacher, ex, temperature) for ex in examples])
    return rows


def choice_dataset(builder: ExampleBuilder, examples: list[Example], tokenizer, rows_of: RowsOf) -> Dataset:
    """Multiple-choice rows for the fast DPO path and for scoring: prompt, letters, chosen, rejected."""
    out = []
    for ex, enc in _encoded(builder, examples, tokenizer, "encode choices"):
        out.append({
            "example_id": ex.example_id,
            "prompt_ids": enc["input_ids"],
            "answer_ids": enc["answer_ids"],
            "score_positions": enc["score_positions"],
            "artwork_ids": rows_of(enc["artwork_ids"]),
            "chosen": -1 if ex.answer is None else ex.answer,
            "rejected": list(ex.rejected),
        })
    return Dataset.from_list(out)
