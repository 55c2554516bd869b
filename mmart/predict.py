"""Choosing = one forward: every candidate's probability for each (member, title) of a split.

Run as: ``mmart predict --model DIR --data DATASET --split test --out preds.parquet``
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mmart.data.contract import UNIFORM_POLICY
from mmart.model.packing import collate_rows
from mmart.model.scoring import score_batch


@torch.inference_mode()
def score_rows(model, rows, pad_token_id: int, batch_size: int = 16, progress: bool = True,
               bf16: bool = False, readout=None) -> dict[int, np.ndarray]:
    """Per decision (by its ``decision_index``), the softmax over its K candidates' scores.

    Rows (``mmart.train.data.decision_rows``, one or more decisions each) are sorted by length
    so a batch pads little; each batch is one forward. ``bf16``: run the forwards under bf16
    autocast (the scores are taken in fp32). On a CPU, grouped key/value heads are read in place.
    """
    from mmart.model.inference import scoring_context

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out: dict[int, np.ndarray] = {}
    dev = next(model.parameters()).device
    bar = tqdm(total=sum(len(r["answer_ids"]) for r in rows), desc="score", unit="decision", disable=not progress)
    for s in range(0, len(order), batch_size):
        batch_rows = [rows[i] for i in order[s: s + batch_size]]
        batch = {k: v.to(dev) for k, v in collate_rows(batch_rows, pad_token_id).items()}
        with scoring_context(dev, bf16):
            scores = score_batch(model, batch, readout)  # [B, D, K], fp32 log-softmax even under autocast
        probs = torch.softmax(scores, dim=-1).cpu().numpy()
        for b, row in enumerate(batch_rows):
            for j, index in enumerate(row["decision_index"]):
                out[index] = probs[b, j, : len(row["answer_ids"][j])]
        bar.update(sum(len(r["answer_ids"]) for r in batch_rows))
    bar.close()
    return out


def average_over_orders(candidates: list[str], views: list[tuple[list[str], np.ndarray]]) -> np.ndarray:
    """Each of ``candidates``' probability averaged over its views (candidate order, probabilities)."""
    total = np.zeros(len(candidates))
    for order, p in views:
        at = {a: i for i, a in enumerate(order)}
        total += np.asarray([p[at[a]] for a in candidates], dtype=float)
    return total / len(views)


def uniform_pairs(impressions: pd.DataFrame, split: str) -> set[tuple[str, str]]:
    """(user_id, title_id) of ``split``'s pairs with an impression logged uniformly at random."""
    from mmart.errors import UserError

    if "logging_policy" not in impressions.columns:
        raise UserError("--slice uniform needs impressions.logging_policy (the optional column that marks the "
                        "uniformly random slice with 'uniform'); this dataset has none: use --slice all")
    rows = impressions[(impressions.split == split) & (impressions.logging_policy == UNIFORM_POLICY)]
    if rows.empty:
        raise UserError(f"no {split} impression has logging_policy == {UNIFORM_POLICY!r}: use --slice all")
    return set(zip(rows.user_id, rows.title_id))


def predictions_frame(examples, probs, impressions: pd.DataFrame, rationales: list[str] | None = None
                      ) -> pd.DataFrame:
    """One row per impression of the scored pairs: candidates, their probabilities, the choice; with
    ``rationales`` (one per example) a ``rationale`` column, the model's own words for its choice."""
    per_pair, said = {}, {}
    for i, (ex, p) in enumerate(zip(examples, probs)):
        per_pair[(ex.user_id, ex.title_id)] = (list(ex.candidates), [float(x) for x in p])
        if rationales is not None:
            said[(ex.user_id, ex.title_id)] = rationales[i]
    rows = []
    for r in impressions.itertuples(index=False):
        hit = per_pair.get((r.user_id, r.title_id))
        if hit is None:
            continue
        cands, p = hit
        best = int(np.argmax(p))
        rows.append({
            "impression_id": r.impression_id, "user_id": r.user_id, "title_id": r.title_id,
            "candidates": cands, "probs": p, "choice": cands[best], "choice_prob": p[best],
            "shown_artwork_id": r.shown_artwork_id, "shown_prob": p[cands.index(r.shown_artwork_id)],
            "played": bool(r.played), "propensity": float(r.propensity), "split": r.split,
            "logging_policy": getattr(r, "logging_policy", None),
            **({"rationale": said[(r.user_id, r.title_id)]} if rationales is not None else {}),
        })
    return pd.DataFrame(rows)


def check_tower(model_dir: Path, cache) -> None:
    """Refuse a cache encoded by another tower than the one the model was trained on (its record says which).

    Only the tower matters, not the cache's rows: artworks added after training need only their rows.
    """
    from mmart.artefacts import read_record, tower_fingerprint
    from mmart.errors import UserError

    trained = (read_record(model_dir) or {}).get("inputs", {}).get("tower")
    if cache is not None and trained and tower_fingerprint(cache.path) != trained:
        raise UserError(f"the cache {cache.path} was encoded by another vision tower (or preprocessing) than {model_dir} "
                        "was trained with; score with that model's cache, or rebuild the cache with its tower")


def predict(model_dir: str | Path, data_dir: str | Path, split: str, out: str | Path | None,
            cfg=None, batch_size: int = 16, max_pairs: int = 0, seed: int | None = None, progress: bool = True,
            pairs: set[tuple[str, str]] | None = None, slice_: str = "all", pack_titles: int | None = None,
            explain: bool = False) -> pd.DataFrame:
    """Load a saved chooser and score every member-title pair of ``split`` (or only ``pairs``,
    (user_id, title_id) tuples; or a seeded sample of ``max_pairs``); write Parquet if ``out``.

    ``slice_="uniform"`` keeps only pairs with an impression logged uniformly at random, so a
    sample of ``max_pairs`` spends all its scoring on the slice with an unbiased hit rate.
    ``pack_titles``: decisions per packed row (default ``eval.pack_titles``; 1 = one prompt each):
    a member's titles share one read of the member's history; the scores are the same.

    A model trained with ``sft.reasoning: before_answer`` writes its rationale before every answer (the
    scores are read after it); ``explain`` has a model trained with ``auxiliary`` write one too (its scores
    do not read it). Either way the frame gets a ``rationale`` column: the model's own words for each pair.
    """
    from mmart.artefacts import predict_made_from
    from mmart.model.checkpoint import load_chooser, read_spec
    from mmart.model.chooser import set_artwork_cache
    from mmart.model.inference import ready_for_scoring
    from mmart.train.common import device, load_inputs, use_bf16
    from mmart.errors import UserError
    from mmart.model.explain import write_rationales
    from mmart.train.data import cache_rows, decision_rows, encode_decisions
    from mmart.train.sft import encoder_for

    start = time.perf_counter()
    model_dir = Path(model_dir)
    read_spec(model_dir)  # one line when the folder is not a saved chooser
    cfg = cfg if cfg is not None else _saved_config(model_dir)
    reasoning = cfg.sft.reasoning
    explain = explain or reasoning == "before_answer"
    if explain and reasoning == "none":
        raise UserError(f"--explain: {model_dir} was trained with sft.reasoning: none, so it never learned to write "
                        "a rationale; train with sft.reasoning: auxiliary (or before_answer) to have it explain")
    seed = cfg.eval.seed if seed is None else seed
    chosen_pairs = pairs is not None  # a caller's own pairs (a review): no record for train.sh to reuse
    inputs = load_inputs(cfg, str(data_dir), check=False, expect_tower=False)
    check_tower(model_dir, inputs.cache)
    model, tokenizer, _ = load_chooser(model_dir, dtype=cfg.model.dtype, device=device())
    if inputs.cache is not None:
        set_artwork_cache(model, inputs.cache.embeddings)
    examples = _examples_to_score(inputs, split, pairs, slice_, max_pairs, seed)
    pack = cfg.eval.pack_titles if pack_titles is None else pack_titles
    orders = cfg.eval.candidate_orders
    # Each extra order is one more title block behind the same member prefix: decision v * n + i.
    views = [[inputs.builder.reordered(ex, v) for ex in examples] for v in range(orders)]
    bf16 = use_bf16(cfg.eval.bf16, "predict")
    prepared = ready_for_scoring(model, bf16)
    encoder, every = encoder_for(inputs, model, tokenizer), [ex for view in views for ex in view]
    texts, decisions = None, None
    if explain:  # the model's own rationale for each view of each pair (the answer reads it under before_answer)
        decisions = encode_decisions(encoder, every, "encode")
        texts = write_rationales(model, encoder, decisions, reasoning, cfg.sft.reasoning_max_tokens,
                                 cache_rows(inputs.cache), batch_size, bf16, progress)
    rows = decision_rows(encoder, every, cache_rows(inputs.cache), pack * orders, desc="encode", rationales=texts,
                         reasoning=reasoning, train_rationales=False, decisions=decisions).to_list()
    scored = score_rows(model, rows, tokenizer.pad_token_id, batch_size, progress, bf16=bf16,
                        readout=inputs.builder.readout)
    n = len(examples)
    probs = [average_over_orders(ex.candidates, [(views[v][i].candidates, scored[v * n + i]) for v in range(orders)])
             for i, ex in enumerate(examples)]
    imps = inputs.contract.frame("impressions")
    frame = predictions_frame(examples, probs, imps[imps.split == split], texts[:n] if texts else None)
    if out:
        record = None if chosen_pairs else predict_made_from(
            model_dir, data_dir, cfg.cache_dir if inputs.cache is not None else None, split, max_pairs, slice_, seed,
            bf16, orders, explain, cfg.sft.reasoning_max_tokens)
        _write_predictions(frame, Path(out), record, model_dir)
    if progress:  # the one summary line of a console run
        from mmart.log import say

        say(f"[mmart predict] scored {len(examples)} {split} pairs ({len(frame)} impressions) in {len(rows)} rows "
            f"(up to {pack} titles per member prefix; {orders} candidate order{'s' if orders > 1 else ''}; {prepared}) in {time.perf_counter() - start:.0f}s -> "
            + (str(out) if out else "not written (no --out)"))
    return frame


def _saved_config(model_dir: Path):
    """The prompt and cache settings the model was trained with (its pipeline.yaml)."""
    import yaml

    from mmart.config import PipelineConfig, from_dict
    from mmart.errors import UserError

    saved = model_dir / "pipeline.yaml"
    if not saved.is_file():
        raise UserError(f"{model_dir} has no pipeline.yaml (the prompt and cache settings the model was trained "
                        "with; `mmart export` folders do not carry one): pass --config <the training config>")
    return from_dict(PipelineConfig, yaml.safe_load(saved.read_text()), str(saved))


def _examples_to_score(inputs, split: str, pairs: set[tuple[str, str]] | None, slice_: str, max_pairs: int,
                       seed: int) -> list:
    """The split's decisions, restricted to ``pairs`` and the slice, then a seeded sample of ``max_pairs``."""
    from mmart.train.data import subsample

    if slice_ not in ("all", UNIFORM_POLICY):
        raise ValueError(f"slice must be 'all' or {UNIFORM_POLICY!r}, got {slice_!r}")
    if slice_ == UNIFORM_POLICY:
        uniform = uniform_pairs(inputs.contract.frame("impressions"), split)
        pairs = uniform if pairs is None else pairs & uniform
    examples = inputs.builder.pair_examples(split)
    if pairs is not None:
        examples = [ex for ex in examples if (ex.user_id, ex.title_id) in pairs]
    return subsample(examples, max_pairs, seed)


def _write_predictions(frame: pd.DataFrame, out: Path, record: dict | None, model_dir: Path) -> None:
    """Parquet, atomically; with its record unless the caller chose the pairs (nothing for train.sh to reuse)."""
    from mmart.artefacts import write_record

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(out)
    if record is not None:
        # Where the model was, so `mmart eval` can write its headline numbers into the model's card.
        write_record(out, {**record, "model_dir": str(model_dir.resolve())})
