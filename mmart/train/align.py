"""Stage 0: align the projector to the LLM's word embeddings before any LLM training.

LLaVA's stage 1 teaches a new projector to caption images through the frozen LLM. On a
2-core CPU that costs as much as SFT itself, so mmart does the cheap part of it: regress
each of the projector's E outputs for an artwork onto the input embedding of one of the
words that describe it (its tags, or its caption; ``word_targets``). No LLM forward is
needed (seconds), and SFT then starts from slots that sit on words the LLM reads in the
history ("romance", "close", ...), instead of from random directions.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from mmart.data.contract import Contract


def describe(tags, caption, source: str) -> str:
    """The words an artwork is aligned to."""
    if source == "caption":
        return str(caption or "")
    words = [str(t).split(":", 1)[-1] for t in (tags if tags is not None else [])]
    return " ".join(words)


def split_words(words: list[str], slots: int) -> list[list[str]]:
    """``words`` in ``slots`` consecutive groups, as even as possible (``numpy.array_split``; tags: one
    family per slot when there are as many slots as tags, e.g. theme / shot / tone / title)."""
    return [list(g) for g in np.array_split(np.array(words, dtype=object), slots)]


@torch.no_grad()
def word_targets(contract: Contract, artwork_ids: list[str], tokenizer, embedding: nn.Embedding, source: str,
                 slots: int = 1) -> torch.Tensor:
    """Target embedding of each artwork's slots: ``[N, slots, H]``.

    Slot e's target is the mean, over the e-th group of the artwork's describing words
    (``split_words``), of each word's first-token input embedding; a group with no word
    targets the EOS embedding. First token, not the mean of a word's tokens: with one word
    per slot the slot then lands on a real token (" close" for "close-up"), which the LLM
    reads like the same token in the history text, while a mean of " close", "-" and "up"
    is a vector it has never seen.
    """
    arts = contract.frame("artworks").set_index("artwork_id")
    weight = embedding.weight
    cached: dict[str, torch.Tensor] = {}

    def word_vector(word: str) -> torch.Tensor:
        if word not in cached:
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            cached[word] = weight[ids[0]].float()
        return cached[word]

    rows = []
    for aid in artwork_ids:
        r = arts.loc[aid]
        words = describe(r.get("tags"), r.get("caption"), source).split()
        groups = split_words(words, slots)
        rows.append(torch.stack([torch.stack([word_vector(w) for w in (g or [tokenizer.eos_token])]).mean(0)
                                 for g in groups]))
    return torch.stack(rows)


def align_projector(projector: nn.Module, vectors: torch.Tensor, targets: torch.Tensor, steps: int = 300,
                    lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Fit ``projector(vectors)`` to ``targets`` (MSE relative to the targets' power, full batch, Adam).

    vectors: ``[N, T, D]`` cached artwork vectors; targets: ``[N, E, H]`` (``word_targets``), one per
    projector output of a cached vector, the same for each of its T vectors.
    Returns the first and last loss and the seconds taken.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    params = [p for p in projector.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    x = vectors.float()
    targets = targets.to(x.device).float()
    n, t, (_, e, h) = x.shape[0], x.shape[1], targets.shape
    y = targets[:, None].expand(n, t, e, h).reshape(n, t * e, h)
    tokens = getattr(getattr(projector, "config", None), "tokens", e)
    if tokens != e:
        raise ValueError(f"the projector emits {tokens} vectors per cached vector but the targets have {e}: "
                         "build targets with slots = the projector's tokens")
    scale = y.pow(2).mean()
    first = last = float("nan")
    was_training = projector.training
    projector.train()
    with torch.enable_grad():
        for step in range(steps):
            loss = (projector(x) - y).pow(2).mean() / scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 0:
                first = loss.item()
            last = loss.item()
    projector.train(was_training)
    return {"loss_first": first, "loss_last": last, "seconds": time.perf_counter() - start}
