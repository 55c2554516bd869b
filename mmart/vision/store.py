"""The cache on disk (safetensors shards + ``manifest.json``) and in memory (:class:`ArtworkCache`).

Layout of a cache folder::

    manifest.json              what built it, dtype, shape [N, T, D], artwork ids in row order,
                               each shard's file sha256, bad images skipped with --skip-bad
    shard-00000.safetensors    "embeddings" [n, T, D]; metadata: its artwork ids, the build
    shard-00001.safetensors    fingerprint's sha256 and the sha256 of the tensor bytes

Every file is written to a temporary name and renamed into place, so a killed build
leaves either a whole shard or none. A shard describes itself (ids, fingerprint, data
hash), which is what lets a rerun keep finished shards without trusting a manifest that
a killed build never wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmart.errors import UserError
from mmart.vision.config import VisionConfig
from mmart.vision.tower import TOWER_KEYS, Fingerprint, expected_fingerprint, fingerprint_differences, sha256_file

MANIFEST = "manifest.json"
FORMAT = "mmart-artwork-cache"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(UserError):
    """A cache that is missing, corrupt, or was built for another tower than the one asked for."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, embeddings: torch.Tensor, artwork_ids: Sequence[str], fingerprint_sha: str) -> None:
    """Atomically write one shard: ``embeddings`` [n, T, D] for ``artwork_ids`` (same order)."""
    from safetensors.torch import save

    assert embeddings.shape[0] == len(artwork_ids)
    emb = embeddings.detach().cpu().contiguous()
    # One metadata key holding sorted JSON: safetensors writes a multi-key metadata map in hash order,
    # which would make two builds of the same shard differ in bytes.
    meta = {"format": FORMAT + "-shard", "fingerprint_sha256": fingerprint_sha,
            "artwork_ids": list(artwork_ids), "data_sha256": tensor_sha256(emb)}
    atomic_write_bytes(path, save({"embeddings": emb}, metadata={"mmart": json.dumps(meta, sort_keys=True)}))


@dataclasses.dataclass
class ShardInfo:
    index: int
    file: str
    artwork_ids: list[str]
    fingerprint_sha: str


def read_shard(path: Path, data: bytes | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """(metadata, embeddings) of a shard; raises ValueError if it is unreadable or its data hash is wrong."""
    from safetensors.torch import load

    try:
        data = path.read_bytes() if data is None else data
        tensors = load(data)
        # The safetensors header: 8-byte little-endian length, then JSON holding "__metadata__".
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        meta = json.loads((header.get("__metadata__") or {}).get("mmart", "{}"))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"unreadable safetensors file ({e})") from e
    emb = tensors.get("embeddings")
    if emb is None or meta.get("format") != FORMAT + "-shard":
        raise ValueError("not an mmart cache shard")
    if tensor_sha256(emb) != meta.get("data_sha256"):
        raise ValueError("tensor bytes do not match the shard's recorded sha256 (corrupt or partly written)")
    if emb.shape[0] != len(meta["artwork_ids"]):
        raise ValueError("row count differs from the shard's artwork ids")
    return meta, emb


def scan_shards(cache_dir: Path) -> tuple[list[ShardInfo], list[tuple[str, str]]]:
    """Valid shards in ``cache_dir`` by index, and (file, problem) for the invalid ones."""
    good, bad = [], []
    for path in sorted(cache_dir.glob("shard-*.safetensors")):
        m = SHARD_RE.match(path.name)
        if not m:
            continue
        try:
            meta, _ = read_shard(path)
        except ValueError as e:
            bad.append((path.name, str(e)))
            continue
        good.append(ShardInfo(int(m.group(1)), path.name, meta["artwork_ids"], meta["fingerprint_sha256"]))
    return sorted(good, key=lambda s: s.index), bad


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path} does not exist: {cache_dir} is not a built cache (run `mmart cache build`; "
                         "a build that stopped early keeps its finished shards and resumes)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON ({e}); rebuild with `mmart cache build`") from e
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not an mmart artwork cache manifest")
    return manifest


def verify_cache(cache_dir: str | Path) -> list[str]:
    """Every problem of a built cache (missing or altered shard, shape or id mismatch); empty = sound."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    problems, ids = [], []
    for shard in manifest["shards"]:
        path = cache_dir / shard["file"]
        if not path.is_file():
            problems.append(f"{shard['file']}: missing")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest (file changed or corrupt)")
            continue
        try:
            meta, emb = read_shard(path, data)
        except ValueError as e:
            problems.append(f"{shard['file']}: {e}")
            continue
        ids += meta["artwork_ids"]
        if list(emb.shape[1:]) != manifest["shape"][1:] or str(emb.dtype).removeprefix("torch.") != manifest["dtype"]:
            problems.append(f"{shard['file']}: shape {list(emb.shape)} / {emb.dtype} differ from the manifest")
    if not problems and ids != manifest["artwork_ids"]:
        problems.append("the shards' artwork ids differ from the manifest's row order")
    if not problems and len(ids) != manifest["shape"][0]:
        problems.append(f"{len(ids)} rows in shards, manifest says {manifest['shape'][0]}")
    return problems


@dataclasses.dataclass
class ArtworkCache:
    """All artwork vectors as one tensor ``embeddings [N, T, D]`` on one device, plus the id -> row index.

    Training and scoring gather rows by index (``cache.embeddings[cache.rows(ids)]``); the
    vision tower never runs in a training step.
    """

    embeddings: torch.Tensor
    artwork_ids: list[str]
    index: dict[str, int]
    bad: dict[str, dict[str, str]]
    manifest: dict[str, Any]
    path: Path

    @property
    def tokens_per_artwork(self) -> int:
        return self.embeddings.shape[1]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[2]

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def load(cls, cache_dir: str | Path, device: str | torch.device = "cpu",
             expect: Fingerprint | VisionConfig | None = None, tokens_per_artwork: int | None = None) -> "ArtworkCache":
        """Load, verify checksums and (with ``expect``) check the cache was built by the tower asked for.

        ``expect`` is a tower fingerprint or a :class:`VisionConfig`; a cache built with another
        architecture, weights, pretrained tag or preprocessing is refused, naming each difference.
        """
        cache_dir = Path(cache_dir)
        manifest = read_manifest(cache_dir)
        if expect is not None:
            wanted = expected_fingerprint(expect) if isinstance(expect, VisionConfig) else expect
            built = {k: manifest["fingerprint"].get(k) for k in TOWER_KEYS}
            diffs = fingerprint_differences(built, {k: wanted.get(k) for k in TOWER_KEYS})
            if diffs:
                raise CacheError(f"cache {cache_dir} was built with another vision tower than the config asks for:\n  - "
                                 + "\n  - ".join(diffs) + "\nRebuild it: mmart cache build --overwrite (or use another --out)")
        if tokens_per_artwork is not None and manifest["shape"][1] != tokens_per_artwork:
            raise CacheError(f"cache {cache_dir} holds {manifest['shape'][1]} token(s) per artwork, the config asks for "
                             f"{tokens_per_artwork}; rebuild with cache.tokens_per_artwork={tokens_per_artwork}")
        parts = []
        for shard in manifest["shards"]:
            path = cache_dir / shard["file"]
            if not path.is_file():
                raise CacheError(f"{path} is missing; rebuild the cache with `mmart cache build` (it resumes)")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise CacheError(f"{path}: sha256 differs from {MANIFEST} (the file changed or is corrupt); delete it "
                                 "and run `mmart cache build` again to re-encode its artworks")
            try:
                parts.append(read_shard(path, data)[1])
            except ValueError as e:
                raise CacheError(f"{path}: {e}") from e
        dim_shape = manifest["shape"][1:]
        emb = torch.cat(parts) if parts else torch.empty(0, *dim_shape, dtype=DTYPES[manifest["dtype"]])
        ids = manifest["artwork_ids"]
        if emb.shape[0] != len(ids):
            raise CacheError(f"{cache_dir}: {emb.shape[0]} rows in shards but {len(ids)} ids in {MANIFEST}; rebuild it")
        bad = {b["artwork_id"]: b for b in manifest.get("bad", [])}
        return cls(emb.to(device), list(ids), {a: i for i, a in enumerate(ids)}, bad, manifest, cache_dir)

    def rows(self, artwork_ids: Sequence[Any]) -> torch.Tensor:
        """Row indices (LongTensor on the cache's device, same shape as ``artwork_ids``, e.g. [B, K]).

        Raises :class:`CacheError` naming every unknown id, and every id skipped as a bad image.
        """
        arr = np.asarray(artwork_ids, dtype=object)
        flat = [str(a) for a in arr.reshape(-1)]
        missing = [a for a in flat if a not in self.index]
        if missing:
            skipped = [a for a in dict.fromkeys(missing) if a in self.bad]
            unknown = [a for a in dict.fromkeys(missing) if a not in self.bad]
            lines = [f"{a}: skipped at build time as a bad image ({self.bad[a]['path']}: {self.bad[a]['reason']}); "
                     "fix or replace the image, then run `mmart cache build` again" for a in skipped[:20]]
            if unknown:
                lines.append(f"{len(unknown)} id(s) not in the cache, e.g. {unknown[:10]}; were they added to the "
                             "catalog after the build? Run `mmart cache build` again (it encodes only new artworks)")
            raise CacheError(f"cache {self.path}: cannot use these artworks:\n  - " + "\n  - ".join(lines))
        idx = torch.tensor([self.index[a] for a in flat], dtype=torch.long).reshape(arr.shape)
        return idx.to(self.embeddings.device)

    def gather(self, artwork_ids: Sequence[Any]) -> torch.Tensor:
        """The vectors of ``artwork_ids``: shape ``ids.shape + [T, D]``."""
        return self.embeddings[self.rows(artwork_ids)]


def manifest_for(cache_dir: Path, shards: list[ShardInfo], fingerprint: Fingerprint, fingerprint_sha: str,
                 dtype: str, tokens: int, dim: int, bad: list[dict[str, str]], dataset: str) -> dict[str, Any]:
    """The manifest of the shards now on disk (row order = shard index order)."""
    ids = [a for s in shards for a in s.artwork_ids]
    return {
        "format": FORMAT, "version": 1,
        "fingerprint": fingerprint, "fingerprint_sha256": fingerprint_sha,
        "dtype": dtype, "shape": [len(ids), tokens, dim], "tokens_per_artwork": tokens,
        "artwork_ids": ids,
        "shards": [{"file": s.file, "rows": len(s.artwork_ids), "sha256": sha256_file(cache_dir / s.file)}
                   for s in shards],
        "bad": bad,
        "dataset": dataset,
    }


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(cache_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
