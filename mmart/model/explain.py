"""The trained chooser writes its own rationale (``sft.reasoning: before_answer | auxiliary``).

Under ``before_answer`` the rationale is part of the answer: the model writes it in its answer
turn, and the candidates' letters are read after it (``PromptEncoder.with_answer_after``). Under
``auxiliary`` it is an explanation on request, written after the rationale block's cue as SFT
taught it; the choice does not depend on it.

Titles of one member share their member prefix: where a member has at least ``SHARED_PREFIX_MIN``
titles (a home page, an evaluation's packed pairs), the prefix is read once into a key/value cache
and that member's titles generate from copies of it (transformers' ``generate`` with a prefilled
cache), so the history is not read again per title. Members with fewer titles are pooled into
batches of whole prompts (left-padded): on a CPU, decoding one or two rows at a time costs nearly
what a batch of sixteen does. Greedy, stopped at the end of the line (the rationale is one line;
SFT closes it with a newline) or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mmart.examples import Decision, PromptEncoder, Segment

SHARED_PREFIX_MIN = 4  # titles of one member prefix from which they generate from its cache


def stop_token_ids(tokenizer) -> list[int]:
    """End of sequence, end of turn, and every token that is only a line break."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for text in ("\n", "\n\n", "<|im_end|>", "<|eot_id|>"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            stops.add(int(ids[0]))
    return sorted(stops)


def clean(text: str) -> str:
    """The first line of what the model wrote, its spacing normalised (what ``with_answer_after`` reads)."""
    line = text.split("\n", 1)[0]
    return " ".join(line.split())


@torch.inference_mode()
def write_rationales(model: nn.Module, encoder: PromptEncoder, decisions: Sequence[Decision], reasoning: str,
                     max_new_tokens: int, rows_of: Callable[[list[str]], list[int]] | None,
                     batch_size: int = 16, bf16: bool = False, progress: bool = True,
                     prefix_caches: dict | None = None) -> list[str]:
    """Each decision's rationale, written by ``model`` behind its member prefix (aligned with ``decisions``).

    ``rows_of``: artwork ids -> rows of the model's artwork cache (None for caption prompts).
    ``prefix_caches``: prefix key -> a one-row key/value cache of that prefix the caller already holds (the
    home-page API's); its titles generate from it, however few.
    """
    from mmart.model.inference import scoring_context

    dev = next(model.parameters()).device
    groups: dict = {}
    for i, d in enumerate(decisions):
        groups.setdefault(d.prefix_key, []).append(i)
    out: list[str] = [""] * len(decisions)
    caches = prefix_caches or {}
    shared = {k for k, members in groups.items() if k in caches or len(members) >= SHARED_PREFIX_MIN}
    pooled = [i for k, members in groups.items() if k not in shared for i in members]
    bar = tqdm(total=len(decisions), desc="write rationales", unit="title", leave=False, disable=not progress)
    tok = encoder.tokenizer
    with scoring_context(dev, bf16):
        for key in shared:
            members = groups[key]
            prefix = decisions[members[0]].prefix
            cache = caches.get(key)
            if cache is None:
                cache = _prefix_cache(model, prefix.ids, _artworks(rows_of, [prefix.artworks], dev), dev)
            for s in range(0, len(members), batch_size):
                chunk = members[s: s + batch_size]
                blocks = [encoder.rationale_prompt(decisions[i], reasoning) for i in chunk]
                texts = _generate(model, tok, prefix.ids, cache, blocks, rows_of, max_new_tokens, dev)
                out = _put(out, chunk, texts)
                bar.update(len(chunk))
        pooled.sort(key=lambda i: len(decisions[i].prefix.ids))  # similar lengths, less padding
        for s in range(0, len(pooled), batch_size):
            chunk = pooled[s: s + batch_size]
            prompts = []
            for i in chunk:
                d, block = decisions[i], encoder.rationale_prompt(decisions[i], reasoning)
                prompts.append(Segment(list(d.prefix.ids) + block.ids, list(d.prefix.artworks) + block.artworks))
            out = _put(out, chunk, _generate(model, tok, [], None, prompts, rows_of, max_new_tokens, dev))
            bar.update(len(chunk))
    bar.close()
    return out


def _put(out: list[str], where: list[int], texts: list[str]) -> list[str]:
    for i, text in zip(where, texts):
        out[i] = text
    return out


def _artworks(rows_of, lists: list[list[str]], dev: torch.device) -> torch.Tensor | None:
    if rows_of is None or not any(lists):
        return None
    from mmart.model.batching import pad_artwork_ids

    return pad_artwork_ids([rows_of(a) if a else [] for a in lists]).to(dev)


def _prefix_cache(model: nn.Module, ids: list[int], artwork_ids, dev: torch.device):
    from transformers import DynamicCache

    from mmart.model.chooser import causal_lm_of

    x = torch.tensor([ids], device=dev)
    cache = DynamicCache(config=causal_lm_of(model).config)
    kwargs = {"artwork_ids": artwork_ids} if artwork_ids is not None else {}
    model(input_ids=x, attention_mask=torch.ones_like(x), cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
    return cache


def _generate(model: nn.Module, tokenizer, prefix_ids: list[int], cache, blocks, rows_of, max_new_tokens: int,
              dev: torch.device) -> list[str]:
    """Greedy continuations of ``blocks``, each after the cached prefix (``cache``; None: ``blocks`` are whole
    prompts, left-padded): padding sits between the prefix and a shorter block, masked, so every block's
    positions continue from the prefix as in training."""
    from mmart.model.chooser import causal_lm_of
    from mmart.model.prefix import repeated_cache

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(b.ids) for b in blocks)
    ids = torch.tensor([prefix_ids + [pad] * (width - len(b.ids)) + list(b.ids) for b in blocks], device=dev)
    mask = torch.tensor([[1] * len(prefix_ids) + [0] * (width - len(b.ids)) + [1] * len(b.ids) for b in blocks],
                        device=dev)
    kwargs = {}
    arts = _artworks(rows_of, [b.artworks for b in blocks], dev)
    if arts is not None:
        kwargs["artwork_ids"] = arts  # the blocks' artworks only: the prefix's are in the cache
    if cache is not None:
        kwargs["cache"] = repeated_cache(cache, len(blocks), causal_lm_of(model).config)
    new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_token_ids(tokenizer), pad_token_id=pad, **kwargs)[:, ids.shape[1]:]
    return [clean(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
