"""Choosing for a whole home page: any member history against any titles and candidate artworks.

No logged dataset is needed: a catalog (titles and artworks tables) for the title text, the
embedding cache for the artworks (an artwork added after training only needs its cache row),
and the member's history. The member prefix (system text, history, summary) runs through the
LLM once; its key/value cache is kept (per member and history, least recently used first out)
and every title block of this call and of later calls for the same member and history reads
it instead of recomputing it. All title blocks of a call go through one forward: on a CPU with
SDPA, attention reads the cached prefix once for all of them (``mmart.model.shared_prefix``);
elsewhere each block is its own row over a copy of the prefix's cache
(``mmart.model.prefix.read_blocks``). Either way a title's scores are the ones its own full
prompt gives (tests/test_serve.py).

Run as (Python)::

    from mmart.serve import HomePageChooser, Watched
    chooser = HomePageChooser.load("outputs/default/dpo/model", "data/world")
    probs = chooser.choose([Watched("t0012", rating=4, artwork_id="t0012_a1", timestamp=1)],
                           {"t0040": ["t0040_a0", "t0040_a1", "t0040_a2"], "t0107": [...]})
    # -> {"t0040": {"t0040_a0": 0.21, ...}, "t0107": {...}}
    explained = chooser.choose_explained(history, titles)  # a model trained with sft.reasoning
    # -> {"t0040": Choice(probs={...}, rationale="..."), ...}: the model's own words for each title

A model trained with ``sft.reasoning: before_answer`` writes its rationale before every answer, in
``choose`` too (the scores read it); one trained with ``auxiliary`` writes one only in
``choose_explained``. Rationales are generated behind the member prefix's cache (``mmart.model.explain``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from mmart.errors import UserError
from mmart.examples import Example, ExampleBuilder, PromptEncoder, Segment
from mmart.model.chooser import causal_lm_of
from mmart.model.prefix import read_blocks, repeated_cache
from mmart.model.shared_prefix import read_blocks_shared, use_shared_prefix_attention

_MEMBER = "\x00member"  # the builder's user id for an API member (never a contract id)


@dataclass
class Watched:
    """One history event: a title the member watched, how they rated it, the artwork they played it from."""

    title_id: str
    rating: int | None = None
    artwork_id: str | None = None
    timestamp: int = 0

    def event(self) -> dict[str, Any]:
        return {"title_id": self.title_id, "rating": self.rating, "artwork_id": self.artwork_id,
                "timestamp": int(self.timestamp)}


@dataclass
class Choice:
    """One title's choice: each candidate's probability, and the model's rationale for it."""

    probs: dict[str, float]
    rationale: str


@dataclass
class _Prefix:
    segment: Segment
    cache: Any  # the LLM's key/value cache of the prefix (a transformers Cache)


class HomePageChooser:
    """A saved chooser, its catalog and cache, ready to score home pages (see the module docstring)."""

    def __init__(self, model, tokenizer, builder: ExampleBuilder, encoder: PromptEncoder, cache=None,
                 bf16: bool = False, max_members: int = 64, reasoning: str = "none",
                 reasoning_max_tokens: int = 64) -> None:
        self.model, self.tokenizer, self.builder, self.encoder = model, tokenizer, builder, encoder
        self.cache, self.bf16, self.max_members = cache, bf16, max_members
        self.reasoning, self.reasoning_max_tokens = reasoning, reasoning_max_tokens  # how it was trained (sft)
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self.stats = {"prefix_forwards": 0, "prefix_hits": 0, "block_forwards": 0}
        # On a CPU with SDPA, the blocks read the one cached prefix once (mmart.model.shared_prefix), not a copy each.
        self.shared_prefix = use_shared_prefix_attention(model)

    @classmethod
    def load(cls, model_dir: str | Path, catalog_dir: str | Path, cfg=None, device: str | None = None,
             max_members: int = 64) -> HomePageChooser:
        """The chooser in ``model_dir`` with the catalog of ``catalog_dir`` and the cache its config names."""
        import yaml

        from mmart.config import PipelineConfig, from_dict
        from mmart.model.checkpoint import load_chooser
        from mmart.model.chooser import set_artwork_cache, slots_per_artwork
        from mmart.model.inference import ready_for_scoring
        from mmart.train.common import load_inputs, use_bf16
        from mmart.train.common import device as training_device

        model_dir = Path(model_dir)
        if cfg is None:
            saved = model_dir / "pipeline.yaml"
            if not saved.is_file():
                raise UserError(f"{model_dir} has no pipeline.yaml (the prompt and cache settings it was trained "
                                "with); pass cfg=load_config(PipelineConfig, <the training config>)")
            cfg = from_dict(PipelineConfig, yaml.safe_load(saved.read_text()), str(saved))
        from mmart.predict import check_tower

        inputs = load_inputs(cfg, str(catalog_dir), check=False, expect_tower=False)
        check_tower(model_dir, inputs.cache)
        model, tokenizer, _ = load_chooser(model_dir, device=device or training_device())
        if inputs.cache is not None:
            set_artwork_cache(model, inputs.cache.embeddings)
        slots = slots_per_artwork(model) if inputs.cache is not None else 1
        encoder = PromptEncoder(inputs.builder, tokenizer, slots)
        bf16 = use_bf16(cfg.eval.bf16, "serve")
        ready_for_scoring(model, bf16)  # bf16 weights stored once (or LoRA merged in fp32): the same scores
        return cls(model, tokenizer, inputs.builder, encoder, inputs.cache, bf16, max_members, cfg.sft.reasoning,
                   cfg.sft.reasoning_max_tokens)

    # --- Prefix: computed once per member and history ----------------------------------------------
    def _prefix(self, history: list[Watched], decided_at: int) -> tuple[str, _Prefix]:
        events = sorted((w.event() for w in history), key=lambda e: -e["timestamp"])
        self.builder.history[_MEMBER] = events
        probe = Example("probe", _MEMBER, "", "serve", decided_at, [])
        segment = self.encoder.encode_pieces([self._head(), *self.builder.prefix_pieces(probe, self.encoder.count_tokens)])
        key = hashlib.sha256(repr((segment.ids, segment.artworks)).encode()).hexdigest()
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            self.stats["prefix_hits"] += 1
            return key, self._prefixes[key]
        ids = torch.tensor([segment.ids], device=self._device())
        cache = DynamicCache(config=causal_lm_of(self.model).config)
        with self._autocast():
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), artwork_ids=self._rows([segment.artworks]),
                       cache=cache, use_cache=True, logits_to_keep=1)
        self.stats["prefix_forwards"] += 1
        self._prefixes[key] = _Prefix(segment, cache)
        while len(self._prefixes) > self.max_members:
            self._prefixes.popitem(last=False)
        return key, self._prefixes[key]

    def _head(self):
        from mmart.model.readout import Text

        return Text(self.encoder.chat_head)

    # --- Title blocks: one forward over all of them, reading the prefix's cache ----------------------
    @torch.inference_mode()
    def choose(self, history: list[Watched], titles: dict[str, list[str]], decided_at: int | None = None
               ) -> dict[str, dict[str, float]]:
        """For each title, the probability of each candidate artwork being the member's best choice.

        ``history``: what the member watched (any order; only events before ``decided_at`` count,
        default: after all of them). ``titles``: title id -> candidate artwork ids (1-8 each).
        """
        return {t: c.probs for t, c in self._choose(history, titles, decided_at, explain=False).items()}

    def choose_explained(self, history: list[Watched], titles: dict[str, list[str]], decided_at: int | None = None
                         ) -> dict[str, Choice]:
        """As ``choose``, with the model's own rationale for each title (a model trained with ``sft.reasoning``
        before_answer or auxiliary; refused, in one line, for one trained without)."""
        return self._choose(history, titles, decided_at, explain=True)

    def _choose(self, history: list[Watched], titles: dict[str, list[str]], decided_at: int | None, explain: bool
                ) -> dict[str, Choice]:
        if not titles:
            return {}
        decided_at = decided_at if decided_at is not None else max([w.timestamp for w in history], default=0) + 1
        key, prefix = self._prefix(history, decided_at)
        p = len(prefix.segment.ids)
        decisions = []  # each with this call's prefix (the encoder's own is cached by member id, not history)
        for title_id, candidates in titles.items():
            if title_id not in self.builder.titles:
                raise UserError(f"title {title_id!r} is not in the catalog's titles table")
            d = self.encoder.decision(Example(f"serve|{title_id}", _MEMBER, title_id, "serve", decided_at,
                                              list(candidates)))
            decisions.append(replace(d, prefix=prefix.segment, prefix_key=(key, 0)))
        said = [""] * len(decisions)
        if explain or self.reasoning == "before_answer":
            said = self._rationales(decisions, {(key, 0): prefix.cache})
        if self.reasoning == "before_answer":  # the answer reads the model's own rationale
            decisions = [self.encoder.with_answer_after(d, r) for d, r in zip(decisions, said)]
        blocks, arts, reads, tokens, where = [], [], [], [], []  # where: per block, (title, candidate) of each read
        for t, d in enumerate(decisions):
            c = 0
            for block in d.blocks:  # one per title, or one per candidate (prompt.candidate_context: own)
                n = len(block.reads)
                blocks.append(block.ids)
                arts.append(block.artworks)
                reads.append(list(block.reads))
                tokens.append(list(d.read_ids[c: c + n]))
                where.append([(t, c + i) for i in range(n)])
                c += n
        dev = self._device()
        k = max(len(t) for t in tokens)
        token_ids = torch.tensor([t + [-1] * (k - len(t)) for t in tokens], device=dev)
        read_at = torch.tensor([r + [r[-1]] * (k - len(r)) for r in reads], device=dev)
        with self._autocast():
            if self.shared_prefix:  # every block reads the prefix's cache in place
                logp = read_blocks_shared(self.model, prefix.cache, p, blocks, self._rows(arts), read_at, token_ids,
                                          fill=prefix.segment.ids[0])
            else:  # each block its own row over a copy of the prefix's cache (kept as it is for the next call)
                cache = repeated_cache(prefix.cache, len(blocks), causal_lm_of(self.model).config)
                logp = read_blocks(self.model, cache, torch.full((len(blocks),), p, device=dev), blocks,
                                   self._rows(arts), read_at, token_ids, fill=prefix.segment.ids[0])
        self.stats["block_forwards"] += 1
        at = [(t, c, n, i) for n, places in enumerate(where) for i, (t, c) in enumerate(places)]
        t_at, c_at, n_at, i_at = (torch.tensor(x, device=logp.device) for x in zip(*at))
        read = torch.full((len(titles), max(len(c) for c in titles.values())), float("-inf"), device=logp.device,
                          dtype=logp.dtype).index_put((t_at, c_at), logp[n_at, i_at])
        scores = self.builder.readout.candidate_scores(read).float()
        probs = torch.softmax(scores, dim=-1).cpu().numpy()
        return {t: Choice(dict(zip(c, np.asarray(probs[i, : len(c)], dtype=float).tolist())), said[i])
                for i, (t, c) in enumerate(titles.items())}

    def _rationales(self, decisions: list, prefix_caches: dict) -> list[str]:
        from mmart.model.explain import write_rationales

        if self.reasoning == "none":
            raise UserError("this chooser was trained with sft.reasoning: none, so it never learned to write a "
                            "rationale; train it with sft.reasoning: auxiliary (or before_answer) to explain")
        rows_of = (lambda a: self.cache.rows(list(a)).tolist()) if self.cache is not None else None
        return write_rationales(self.model, self.encoder, decisions, self.reasoning, self.reasoning_max_tokens,
                                rows_of, bf16=self.bf16, progress=False, prefix_caches=prefix_caches)

    # --- helpers -----------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _rows(self, artwork_lists: list[list[str]]) -> torch.Tensor | None:
        if self.cache is None:
            return None
        from mmart.model.batching import pad_artwork_ids

        return pad_artwork_ids([self.cache.rows(a).tolist() if a else [] for a in artwork_lists]).to(self._device())

    def _autocast(self):
        from mmart.model.inference import scoring_context

        return scoring_context(self._device(), self.bf16)
