"""Opening one artwork file under mmart's limits: a regular file, at most MAX_FILE_BYTES and MAX_PIXELS.

Below the contract and the vision layer, so both open images the same way: the contract's
lazy ``image`` column and the cache, adapt and review readers all come through :func:`open_rgb`
(or :func:`read_image_file`). A file that cannot or may not be opened raises :class:`ImageRefused`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmart.errors import UserError


# The limits every artwork image is opened under (cache build, vision adapt, review, the contract's image column).
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (~89.5 MP; ~0.25 GB of RGBA): refused, not warned
MAX_FILE_BYTES = 256 << 20  # a file is read whole (hashed and decoded from the same bytes): cap the memory


class ImageRefused(UserError):
    """An artwork image that cannot or may not be opened; ``reason`` is the short cause, the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"image {path}: {reason}")


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
