"""Reading artwork images safely: resolve inside the dataset folder, decode, preprocess, report what is bad.

Decoding and preprocessing run in DataLoader workers; a bad image (missing, truncated,
not an image, past Pillow's decompression-bomb limit, or a path that escapes the
dataset folder) is returned as a reason string instead of raising, so one pass finds
*every* bad artwork and the caller can list them all at once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from mmart.data.contract import Contract
from mmart.errors import UserError


@dataclasses.dataclass(frozen=True)
class ArtworkItem:
    """One artwork to read: its id, the path as the contract stores it, and the resolved file (None if it escapes)."""

    artwork_id: str
    rel_path: str
    path: Path | None


@dataclasses.dataclass(frozen=True)
class BadImage:
    artwork_id: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.artwork_id} ({self.path}): {self.reason}"


def catalog_items(contract: Contract, only_ids: Iterable[str] | None = None) -> list[ArtworkItem]:
    """Artworks of the contract (all, or ``only_ids``) in ``artworks.parquet`` order, paths resolved inside the folder."""
    frame = contract.frame("artworks")
    ids = [str(a) for a in frame["artwork_id"]]
    dup = sorted(a for a, n in Counter(ids).items() if n > 1)
    if dup:
        raise UserError(f"{contract.root}/artworks.parquet: artwork_id not unique ({dup[:10]}); "
                        "run `mmart validate` and give every artwork its own id")
    wanted = None if only_ids is None else set(only_ids)
    root = os.path.realpath(contract.root)
    items = []
    for aid, rel in zip(ids, frame["path"]):
        if wanted is None or aid in wanted:
            items.append(ArtworkItem(aid, str(rel), _inside(root, rel)))
    return items


def _inside(real_root: str, rel: object) -> Path | None:
    """``real_root/rel`` with links resolved, or None if ``rel`` is absolute or leaves the folder.

    The same rule as ``mmart.data.contract.resolve_inside``, with the root resolved once per
    catalog instead of once per artwork (it was a third of a 500-image build).
    """
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        return None
    path = os.path.realpath(os.path.join(real_root, rel))
    return Path(path) if path.startswith(real_root + os.sep) else None


def open_rgb(path: Path) -> Image.Image:
    """Fully decode ``path`` to RGB; Pillow's decompression-bomb *warning* is an error here too.

    ``load()`` forces the whole decode, so a truncated file fails now, not later inside a transform.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")


def read_problem(item: ArtworkItem) -> tuple[Image.Image | None, str | None]:
    """(image, None) or (None, reason) for one artwork."""
    if item.path is None:
        return None, "path is absolute or escapes the dataset folder"
    try:
        return open_rgb(item.path), None
    except FileNotFoundError:
        return None, "file is missing"
    except IsADirectoryError:
        return None, "path is a directory, not an image"
    except UnidentifiedImageError:
        return None, "not an image Pillow can read"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return None, f"too many pixels (decompression-bomb guard): {e}"
    except (OSError, SyntaxError, ValueError) as e:  # Pillow raises these for truncated / corrupt data
        return None, f"truncated or corrupt image: {e}"


class ArtworkImages(torch.utils.data.Dataset):
    """``items[i]`` -> ``(i, pixels [3, H, W] or None, reason or None)``; ``preprocess`` is open_clip's transform."""

    def __init__(self, items: Sequence[ArtworkItem], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.items = list(items)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        image, reason = read_problem(self.items[i])
        if image is None:
            return i, None, reason
        try:
            return i, self.preprocess(image), None
        except Exception as e:  # a transform failing on a decodable image is still a bad image, not a crash
            return i, None, f"preprocessing failed: {e}"


def collate(batch: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """Stack the good images; keep the positions of good and bad ones."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    return {
        "positions": [i for i, _ in good],
        "pixels": torch.stack([x for _, x in good]) if good else None,
        "bad": [(i, r) for i, x, r in batch if x is None],
    }


def keep_freed_memory() -> None:
    """Stop glibc from returning freed activation buffers to the OS after every batch.

    With glibc's default (dynamic) mmap threshold, the first dozen CPU forward passes each
    mmap and page-fault fresh multi-MB buffers, measured 10-20x slower than steady state on
    this project's 2-core machines. Raising the mmap and trim thresholds keeps the memory
    in the heap for reuse (as jemalloc/tcmalloc would). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 26)  # M_MMAP_THRESHOLD: 64 MiB (a batch's activations are a few MiB)
        libc.mallopt(-1, 1 << 27)  # M_TRIM_THRESHOLD: keep up to 128 MiB of freed heap for reuse
    except (OSError, AttributeError):
        pass
