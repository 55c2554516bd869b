"""``mmart cache probe``: does the cache carry what an artwork shows? A linear probe says.

Run as: ``mmart cache probe outputs/default/cache --data data/world``

A multinomial logistic regression (written in torch, fitted with L-BFGS; no sklearn) is
trained on the cached vectors of a seeded 70% of the artworks and scored on the other
30%, once per tag family (``theme:``, ``shot:``). The bar for the default tower:
theme >= 0.90 and shot >= 0.85 on the default world. If a linear probe cannot read
theme and shot, the chooser's projector (also nearly linear) will not either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mmart.errors import UserError

DEFAULT_BARS = {"theme": 0.90, "shot": 0.85}


@dataclasses.dataclass
class ProbeResult:
    label: str
    accuracy: float
    classes: int
    train: int
    test: int
    majority: float  # accuracy of always guessing the most common training class: the floor to beat


def tag_labels(frame: Any, family: str) -> dict[str, str]:
    """artwork_id -> the value of its ``family:value`` tag (artworks without one are left out)."""
    out = {}
    for aid, tags in zip(frame["artwork_id"], frame["tags"] if "tags" in frame else [None] * len(frame)):
        for t in tags if tags is not None else []:
            if str(t).startswith(family + ":"):
                out[str(aid)] = str(t).split(":", 1)[1]
                break
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3,
                 max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``x [N, F] -> y [N]`` with L-BFGS; returns (weight [F, C], bias [C])."""
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(features: torch.Tensor, labels: Sequence[str], seed: int = 0, train_fraction: float = 0.7,
                 l2: float = 1e-3, name: str = "") -> ProbeResult:
    """Fit on a seeded ``train_fraction`` of rows, return accuracy on the rest. ``features``: [N, F]."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"probe {name!r}: need at least 2 classes, found {classes}")
    y = torch.tensor([classes.index(v) for v in labels])
    x = features.double().cpu()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * len(y)))
    tr, te = perm[:n_train], perm[n_train:]
    if len(te) == 0 or len(tr) == 0:
        raise UserError(f"probe {name!r}: {len(y)} labelled artworks are too few for a {train_fraction:.0%} split")
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-8)  # standardise with training statistics only
    x = (x - mean) / std
    w, b = fit_logistic(x[tr], y[tr], len(classes), l2=l2)
    acc = float(((x[te] @ w + b).argmax(1) == y[te]).double().mean())
    majority = float((y[te] == torch.bincount(y[tr], minlength=len(classes)).argmax()).double().mean())
    return ProbeResult(name, acc, len(classes), len(tr), len(te), majority)


def probe_cache(cache_dir: str, data_dir: str, families: Sequence[str] = ("theme", "shot"), seed: int = 0,
                train_fraction: float = 0.7) -> list[ProbeResult]:
    """Probe a built cache against the dataset's tags, one result per tag family."""
    from mmart.data.contract import load_contract
    from mmart.vision.store import ArtworkCache

    cache = ArtworkCache.load(cache_dir, device="cpu")
    frame = load_contract(data_dir, check=False).frame("artworks")
    results = []
    for family in families:
        labels = tag_labels(frame, family)
        ids = [a for a in cache.artwork_ids if a in labels]  # cache row order, so the split is stable
        if not ids:
            raise UserError(f"no artwork in {data_dir} has a {family}:<value> tag that is also in the cache")
        x = cache.embeddings[cache.rows(ids)].flatten(1)  # [N, T * D]
        results.append(linear_probe(x, [labels[a] for a in ids], seed, train_fraction, name=family))
    return results
