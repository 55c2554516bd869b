"""Examples -> tokenized rows (``datasets.Dataset``) for SFT, DPO and scoring.

Every stage uses the same rows (``mmart.model.packing``): a member prefix and one or more
title blocks, with per-decision labels. Artwork ids become cache row indices here, once,
so the training step only gathers rows from the device-resident cache tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from mmart.errors import UserError
from mmart.examples import Decision, Example, PromptEncoder
from mmart.model.packing import collate_rows, pack_decisions


@dataclass
class DecisionCollator:
    """Pads packed decision rows into a batch (``mmart.model.packing.collate_rows``, rows right-padded):
    what the SFT trainer and the fast DPO trainer both take."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_rows(rows, self.pad_token_id)

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


def subsample(examples: list[Example], n: int, seed: int, group: Callable[[Example], object] | None = None) -> list[Example]:
    """A seeded sample of ``n`` examples (all when n <= 0 or n >= len), in their original order.

    ``group``: draw whole groups (e.g. a member's decisions that share a prompt prefix, so that
    packed rows hold several titles) until ``n`` examples are drawn; the last group is cut.
    """
    if n <= 0 or n >= len(examples):
        return examples
    rng = np.random.default_rng(seed)
    if group is None:
        return [examples[i] for i in np.sort(rng.choice(len(examples), n, replace=False))]
    groups: dict[object, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(group(ex), []).append(i)
    keys = list(groups)
    picked: list[int] = []
    for g in rng.permutation(len(keys)):
        picked.extend(groups[keys[g]][: n - len(picked)])
        if len(picked) >= n:
            break
    return [examples[i] for i in sorted(picked)]


def importance_weights(examples: Sequence[Example], clip: float | None) -> list[float]:
    """min(1 / propensity, clip), scaled to mean 1 over the labelled examples (1.0 when ``clip`` is None).

    Learning which artwork was played from logs of a biased serving policy learns that
    policy's taste too: the share of plays an artwork gets grows with how often it was shown.
    Weighting each played example by 1/propensity targets what members play (clipped, so a
    few rare shows cannot dominate); scaling to mean 1 keeps the loss scale of unweighted SFT.
    """
    if clip is None:
        return [1.0] * len(examples)
    raw = np.array([min(1.0 / (e.propensity or 1.0), clip) for e in examples])
    labelled = np.array([e.answer is not None for e in examples])
    mean = raw[labelled].mean() if labelled.any() else 1.0
    return (raw / mean).tolist()


def teacher_targets(teacher, ex: Example, temperature: float = 1.0) -> list[float]:
    """The teacher's choice distribution over the candidates: ``softmax(logit(q_k) / T)``.

    ``q_k`` is the teacher's P(play | candidate k). A small T keeps the teacher's ranking and
    drops its (nearly flat) probability scale: for a chooser, the ranking is what is learned.
    """
    q = np.clip(teacher.predict([ex.user_id] * len(ex.candidates), ex.candidates), 1e-6, 1 - 1e-6)
    z = (np.log(q) - np.log1p(-q)) / temperature
    p = np.exp(z - z.max())
    return (p / p.sum()).tolist()


def encode_decisions(encoder: PromptEncoder, examples: Sequence[Example], desc: str = "encode") -> list[Decision]:
    return [encoder.decision(ex) for ex in tqdm(examples, desc=desc, unit="ex", leave=False)]


def with_rationales(encoder: PromptEncoder, decisions: list[Decision], rationales: dict[str, str] | Sequence[str],
                    reasoning: str, trained: bool = True) -> list[Decision]:
    """``decisions`` with their rationales, as ``reasoning`` places them (see ``decision_rows``)."""
    if isinstance(rationales, dict):
        texts = [rationales.get(d.example.example_id) for d in decisions]
    else:
        if len(rationales) != len(decisions):
            raise ValueError(f"{len(rationales)} rationales for {len(decisions)} decisions")
        texts = list(rationales)
    if reasoning == "before_answer":
        return [encoder.with_answer_after(d, t or "", trained) for d, t in zip(decisions, texts)]
    if reasoning != "auxiliary":
        raise ValueError(f"reasoning must be auxiliary or before_answer, got {reasoning!r}")
    if not trained:
        return decisions  # an auxiliary rationale is never read by the choice
    return [encoder.with_rationale(d, t) if t is not None else d for d, t in zip(decisions, texts)]


def oracle_play(data_dir: str | Path) -> Callable[[Example], list[float]] | None:
    """The demo world's true P(play) of each candidate of a decision (``oracle.parquet``), or None elsewhere."""
    import pandas as pd

    path = Path(data_dir) / "oracle.parquet"
    if not path.is_file():
        return None
    o = pd.read_parquet(path, columns=["user_id", "title_id", "artwork_id", "p_play"])
    table = dict(zip(zip(o.user_id, o.title_id, o.artwork_id), o.p_play))
    return lambda ex: [float(table.get((ex.user_id, ex.title_id, a), float("nan"))) for a in ex.candidates]


def decision_rows(encoder: PromptEncoder, examples: Sequence[Example], rows_of: RowsOf, max_titles: int = 1,
                  teacher=None, teacher_temperature: float = 1.0, propensity_clip: float | None = None,
                  desc: str = "encode", true_play: Callable[[Example], list[float]] | None = None,
                  rationales: dict[str, str] | Sequence[str] | None = None, reasoning: str = "auxiliary",
                  train_rationales: bool = True, decisions: list[Decision] | None = None) -> Dataset:
    """Rows of ``max_titles`` decisions sharing a member prefix (1 = one prompt per decision), with labels:
    ``chosen`` (index of the played candidate, -1 if none), ``rejected`` (indices), ``weight`` (importance
    weight of the played label), with a ``teacher`` ``target_probs`` (its choice distribution), and with
    ``true_play`` (``oracle_play``) ``true_p``: each candidate's true P(play), for the val true value.
    ``rationales`` (example_id -> text, or one text per example): under ``reasoning: auxiliary`` each decision
    that has one also gets its rationale block (``PromptEncoder.with_rationale``); under ``before_answer`` every
    decision is read after its rationale (``PromptEncoder.with_answer_after``; none: an empty one). The rows
    carry rationale labels when ``train_rationales`` (SFT), not when the rationale is only read (DPO, scoring).
    ``decisions``: ``examples`` already encoded (a caller that generated rationales from them)."""
    decisions = decisions if decisions is not None else encode_decisions(encoder, examples, desc)
    if rationales is not None:
        decisions = with_rationales(encoder, decisions, rationales, reasoning, train_rationales)
    fields: dict[str, list] = {
        "chosen": [-1 if ex.answer is None else ex.answer for ex in examples],
        "rejected": [list(ex.rejected) for ex in examples],
        "weight": importance_weights(examples, propensity_clip),
    }
    if teacher is not None:
        fields["target_probs"] = [teacher_targets(teacher, ex, teacher_temperature) for ex in examples]
    if true_play is not None:
        fields["true_p"] = [true_play(ex) for ex in examples]
    return Dataset.from_list(pack_decisions(decisions, max_titles, rows_of, fields))
