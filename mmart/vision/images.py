"""Reading artwork images safely: resolve inside the dataset folder, decode, preprocess, report what is bad.

Every image mmart opens goes through :func:`open_rgb` (or :func:`read_image_file`): a
regular file only (a FIFO named ``.png`` would block the reader), at most MAX_FILE_BYTES,
at most MAX_PIXELS. Decoding and preprocessing run in DataLoader workers; a bad image
(missing, truncated, not an image, too many pixels, not a regular file, or a path that
escapes the dataset folder) is returned as a reason string instead of raising, so one
pass finds *every* bad artwork and the caller can list them all at once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image

from mmart.data.contract import Contract, locate, short
from mmart.data.image_file import (MAX_FILE_BYTES, MAX_PIXELS, ImageRefused, decode_rgb, image_fingerprint,  # noqa: F401
                                   image_size, open_rgb, read_image_file)
from mmart.errors import UserError


@dataclasses.dataclass(frozen=True)
class ArtworkItem:
    """One artwork to read: its id, the path as the contract stores it, the resolved file (None if unusable), why."""

    artwork_id: str
    rel_path: str
    path: Path | None
    problem: str | None = None  # set when ``path`` is None: why the stored path cannot be used


@dataclasses.dataclass(frozen=True)
class BadImage:
    artwork_id: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.artwork_id} ({short(self.path)}): {self.reason}"


def catalog_items(contract: Contract, only_ids: Iterable[str] | None = None) -> list[ArtworkItem]:
    """Artworks of the contract (all, or ``only_ids``) in ``artworks.parquet`` order, paths resolved inside the folder."""
    frame = contract.frame("artworks")
    ids = [str(a) for a in frame["artwork_id"]]
    dup = sorted(a for a, n in Counter(ids).items() if n > 1)
    if dup:
        raise UserError(f"{contract.root}/artworks.parquet: artwork_id not unique ({dup[:10]}); "
                        "run `mmart validate` and give every artwork its own id")
    wanted = None if only_ids is None else set(only_ids)
    root = os.path.realpath(contract.root)  # resolved once per catalog, not once per artwork
    items = []
    for aid, rel in zip(ids, frame["path"]):
        if wanted is None or aid in wanted:
            found = locate(root, rel)
            unusable = found.path is None
            items.append(ArtworkItem(aid, str(rel), found.path, found.problem if unusable else None))
    return items


def read_problem(item: ArtworkItem) -> tuple[Image.Image | None, str | None, str | None]:
    """(image, sha256 of the bytes it was decoded from, None) or (None, None, reason) for one artwork."""
    if item.path is None:
        return None, None, item.problem or "path is absolute or escapes the dataset folder"
    try:
        data, _ = read_image_file(item.path)
        return decode_rgb(data, item.path), hashlib.sha256(data).hexdigest(), None
    except ImageRefused as e:
        return None, None, e.reason


class ArtworkImages(torch.utils.data.Dataset):
    """``items[i]`` -> ``(i, pixels [3, H, W] or None, reason or None, image sha256 or None)``.

    ``preprocess`` is open_clip's transform. The sha256 is of the very bytes that were decoded,
    so a shard records the content its vectors were computed from, even if the file changes later.
    """

    def __init__(self, items: Sequence[ArtworkItem], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.items = list(items)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, str | None]:
        image, sha, reason = read_problem(self.items[i])
        if image is None:
            return i, None, reason, None
        try:
            return i, self.preprocess(image), None, sha
        except Exception as e:  # a transform failing on a decodable image is still a bad image, not a crash
            return i, None, f"preprocessing failed: {e}", None


def collate(batch: list[tuple[int, torch.Tensor | None, str | None, str | None]]) -> dict[str, Any]:
    """Stack the good images; keep the positions (and content hashes) of good ones and the bad ones' reasons."""
    good = [(i, x, sha) for i, x, _, sha in batch if x is not None]
    return {
        "positions": [i for i, _, _ in good],
        "sha256": [sha for _, _, sha in good],
        "pixels": torch.stack([x for _, x, _ in good]) if good else None,
        "bad": [(i, r) for i, x, r, _ in batch if x is None],
    }


def keep_freed_memory() -> None:
    """Stop glibc from returning freed activation buffers to the OS after every batch.

    With glibc's default (dynamic) mmap threshold, the first dozen CPU forward passes each
    mmap and page-fault fresh multi-MB buffers, far slower than steady state. Raising the mmap and trim thresholds keeps the memory
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
