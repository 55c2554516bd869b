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
import errno
import hashlib
import io
import os
import stat
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from mmart.data.contract import Contract, locate, short
from mmart.errors import UserError


# The limits every artwork image is opened under (cache build, vision adapt, review, the contract's image column).
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (~89.5 MP; ~0.25 GB of RGBA): refused, not warned
MAX_FILE_BYTES = 256 << 20  # a file is read whole (hashed and decoded from the same bytes): cap the memory


class ImageRefused(UserError):
    """An artwork image that cannot or may not be opened; ``reason`` is the short cause, the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"image {path}: {reason}")


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


def read_image_file(path: str | Path) -> tuple[bytes, os.stat_result]:
    """(the whole file, its stat) if it is a regular file under MAX_FILE_BYTES; raises :class:`ImageRefused`.

    Opened non-blocking and checked with ``fstat`` on the open descriptor before reading, so
    a FIFO (or device) named ``.png`` is refused instead of blocking the reader forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageRefused(path, "file is missing") from None
    except ValueError:  # a NUL byte in the path
        raise ImageRefused(path, "path contains a NUL byte") from None
    except OSError as e:
        reason = {errno.ELOOP: "path is a symlink loop", errno.ENAMETOOLONG: "path is too long",
                  errno.EACCES: "file is not readable (permission denied)"}.get(e.errno, f"cannot open ({e.strerror or e})")
        raise ImageRefused(path, reason) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageRefused(path, "path is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise ImageRefused(path, "not a regular file (a FIFO, socket or device is never opened as an image)")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageRefused(path, f"file is {st.st_size} bytes, over the {MAX_FILE_BYTES >> 20} MiB limit")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:  # it grew while being read
        raise ImageRefused(path, f"file is over the {MAX_FILE_BYTES >> 20} MiB limit")
    return data, st


def image_fingerprint(path: str | Path) -> tuple[str, list[int]]:
    """(sha256 of the file's bytes, [size, mtime_ns] taken before reading them); raises :class:`ImageRefused`.

    The stat comes from the descriptor the bytes were read from, before the read: a write
    during or after the read changes the mtime, so a later stat-only check cannot miss it.
    """
    data, st = read_image_file(path)
    return hashlib.sha256(data).hexdigest(), [st.st_size, st.st_mtime_ns]


def _open_checked(data: bytes, path: str | Path) -> Image.Image:
    """Pillow's lazy open of ``data`` (header only) with the pixel limit applied; raises :class:`ImageRefused`."""
    try:
        with warnings.catch_warnings():  # the limit is checked below, as an error, whatever the warning filters say
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRefused(path, f"too many pixels (decompression-bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise ImageRefused(path, "not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRefused(path, f"truncated or corrupt image: {e}") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageRefused(path, f"too many pixels (decompression-bomb guard): {w}x{h} = {w * h} pixels, "
                                 f"the limit is {MAX_PIXELS}")
    return im


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header, under the same checks as :func:`open_rgb`; raises :class:`ImageRefused`."""
    return _open_checked(read_image_file(path)[0], path).size


def decode_rgb(data: bytes, path: str | Path) -> Image.Image:
    """Fully decode an image file's bytes to RGB under the limits; raises :class:`ImageRefused`.

    ``load()`` forces the whole decode, so a truncated file fails now, not later inside a transform.
    """
    im = _open_checked(data, path)
    try:
        with im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageRefused(path, f"truncated or corrupt image: {e}") from None


def open_rgb(path: str | Path) -> Image.Image:
    """The one way mmart opens an artwork: a regular file, at most MAX_FILE_BYTES and MAX_PIXELS, decoded to RGB."""
    return decode_rgb(read_image_file(path)[0], path)


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
