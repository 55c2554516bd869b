"""Stage 0: align the projector to the LLM's word embeddings before any LLM training.

LLaVA's stage 1 teaches a new projector to caption images through the frozen LLM. On a
2-core CPU that costs as much as SFT itself, so mmart does the cheap part of it: regress
the projector's output for each artwork onto the mean input embedding of the words that
describe it (its tags or caption). No LLM forward is needed (seconds), and SFT then
starts from artwork vectors that already sit near words the LLM reads in the history
("romance", "close-up", ...), instead of from random directions.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mmart.data.contract import Contract


def describe(tags, caption, source: str) -> str:
    """The words an artwork is aligned to."""
    if source == "caption":
        return str(caption or "")
    words = [str(t).split(":", 1)[-1] for t in (tags if tags is not None else [])]
    return " ".join(words)


@torch.no_grad()
def word_targets(contract: Contract, artwork_ids: list[str], tokenizer, embedding: nn.Embedding, source: str) -> torch.Tensor:
    """Mean input embedding of each artwork's description: [N, H]."""
    arts = contract.frame("artworks").set_index("artwork_id")
    rows = []
    weight = embedding.weight
    for aid in artwork_ids:
        r = arts.loc[aid]
        # Average per word first, so a word split into several tokens ("close-up") weighs as one word.
        words = describe(r.get("tags"), r.get("caption"), source).split() or [tokenizer.eos_token]
        vecs = [weight[torch.tensor(tokenizer(" " + w, add_special_tokens=False)["input_ids"], device=weight.device)]
                .float().mean(0) for w in words]
        rows.append(torch.stack(vecs).mean(0))
    return torch.stack(rows)


def align_projector(projector: nn.Module, vectors: torch.Tensor, targets: torch.Tensor, steps: int = 300,
                    lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Fit ``projector(vectors[:, t]) ~ targets`` for every slot t (MSE, full batch, Adam).

    vectors: [N, T, D] cached artwork vectors; targets: [N, H]. Returns the first and last loss.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    params = [p for p in projector.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    x = vectors.float()
    y = targets.to(x.device)[:, None, :].expand(-1, x.shape[1], -1)
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
