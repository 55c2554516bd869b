"""The cache on disk (safetensors shards + ``manifest.json``) and in memory (:class:`ArtworkCache`).

Layout of a cache folder::

    manifest.json              what built it, dtype, shape [N, T, D], artwork ids in row order,
                               each row's image sha256 (and the file's size and mtime then),
                               each shard's file sha256, bad images skipped with --skip-bad
    shard-00000.safetensors    "embeddings" [n, T, D]; metadata: its artwork ids, the sha256 of
    shard-00001.safetensors    each artwork's image file, the build fingerprint's sha256 and the
                               sha256 of the tensor bytes

Every file is written to a temporary name and renamed into place, so a killed build
leaves either a whole shard or none. A shard describes itself (ids, fingerprint, data
hash), which is what lets a rerun keep finished shards without trusting a manifest that
a killed build never wrote. A row is kept only while its image's sha256 is unchanged: a
shard holding an artwork whose image changed is encoded again, and loading a cache whose
images changed since the build is refused (see :func:`changed_images`).
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
VERSION = 2  # 2: every row records its image's sha256
MAX_LISTED = 20
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


def write_shard(path: Path, embeddings: torch.Tensor, artwork_ids: Sequence[str], image_sha256: Sequence[str],
                fingerprint_sha: str) -> None:
    """Atomically write one shard: ``embeddings`` [n, T, D] for ``artwork_ids`` and their images' sha256 (same order)."""
    from safetensors.torch import save

    assert embeddings.shape[0] == len(artwork_ids) == len(image_sha256)
    emb = embeddings.detach().cpu().contiguous()
    # One metadata key holding sorted JSON: safetensors writes a multi-key metadata map in hash order,
    # which would make two builds of the same shard differ in bytes.
    meta = {"format": FORMAT + "-shard", "fingerprint_sha256": fingerprint_sha, "artwork_ids": list(artwork_ids),
            "image_sha256": list(image_sha256), "data_sha256": tensor_sha256(emb)}
    atomic_write_bytes(path, save({"embeddings": emb}, metadata={"mmart": json.dumps(meta, sort_keys=True)}))


@dataclasses.dataclass
class ShardInfo:
    index: int
    file: str
    artwork_ids: list[str]
    fingerprint_sha: str
    image_sha256: list[str]


def read_shard(path: Path, data: bytes | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """(metadata, embeddings) of a shard; raises ValueError if it is unreadable, incomplete or its data hash is wrong."""
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
    if emb is None or not isinstance(meta, dict) or meta.get("format") != FORMAT + "-shard":
        raise ValueError("not an mmart cache shard")
    if tensor_sha256(emb) != meta.get("data_sha256"):
        raise ValueError("tensor bytes do not match the shard's recorded sha256 (corrupt or partly written)")
    ids, shas = meta.get("artwork_ids"), meta.get("image_sha256")
    if not isinstance(ids, list) or emb.shape[0] != len(ids):
        raise ValueError("row count differs from the shard's artwork ids")
    if not isinstance(shas, list) or len(shas) != len(ids):
        raise ValueError("no image sha256 per row (built by an older mmart)")
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
        except FileNotFoundError:  # deleted by a concurrent build that found it stale
            continue
        except ValueError as e:
            bad.append((path.name, str(e)))
            continue
        good.append(ShardInfo(int(m.group(1)), path.name, meta["artwork_ids"], meta["fingerprint_sha256"],
                              meta["image_sha256"]))
    return sorted(good, key=lambda s: s.index), bad


def _manifest_problem(m: Any) -> str | None:
    """What is malformed in a parsed manifest (a missing key, a wrong type), or None."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return "is not an mmart artwork cache manifest"
    if m.get("version") != VERSION:
        return (f"has format version {m.get('version')!r}, this mmart reads {VERSION} (older caches do not record "
                "their images' sha256)")
    checks = {
        "fingerprint": isinstance(m.get("fingerprint"), dict),
        "dtype": m.get("dtype") in DTYPES,
        "shape": isinstance(m.get("shape"), list) and len(m["shape"]) == 3
        and all(isinstance(x, int) and x >= 0 for x in m["shape"]),
        "artwork_ids": isinstance(m.get("artwork_ids"), list) and all(isinstance(a, str) for a in m["artwork_ids"]),
        "image_sha256": isinstance(m.get("image_sha256"), list),
        "image_stat": isinstance(m.get("image_stat"), list),
        "shards": isinstance(m.get("shards"), list) and all(
            isinstance(sh, dict) and isinstance(sh.get("file"), str) and SHARD_RE.match(sh["file"])
            and isinstance(sh.get("sha256"), str) for sh in m["shards"]),
        "bad": isinstance(m.get("bad", []), list),
    }
    broken = [k for k, ok in checks.items() if not ok]
    if broken:
        return f"has a missing or malformed {', '.join(repr(k) for k in broken)}"
    n = len(m["artwork_ids"])
    if len(m["image_sha256"]) != n or len(m["image_stat"]) != n:
        return f"lists {n} artwork ids but {len(m['image_sha256'])} image sha256 and {len(m['image_stat'])} stats"
    return None


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The parsed, structurally checked manifest; a missing, damaged or outdated one is a one-line CacheError."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path} does not exist: {cache_dir} is not a built cache (run `mmart cache build`; "
                         "a build that stopped early keeps its finished shards and resumes)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); rebuild with `mmart cache build`") from e
    problem = _manifest_problem(manifest)
    if problem:
        fix = ("re-encode it" if isinstance(manifest, dict) and manifest.get("version") != VERSION
               else "rewrite it (valid shards are kept)")
        raise CacheError(f"{path} {problem}; run `mmart cache build` on this folder to {fix}")
    return manifest


def manifest_dataset(manifest: dict[str, Any], data_dir: str | Path | None = None) -> Path | None:
    """The dataset folder to check images against: ``data_dir``, else the one the cache was built from, if present."""
    folder = data_dir if data_dir is not None else manifest.get("dataset")
    if not folder or not (Path(folder) / "artworks.parquet").is_file():
        return None
    return Path(folder)


def changed_images(data_dir: str | Path, artwork_ids: Sequence[str], image_sha256: Sequence[str],
                   image_stat: Sequence[Any] | None = None) -> list[str]:
    """The rows whose image in ``data_dir`` is no longer the one that was encoded, one line each.

    With ``image_stat`` (the manifest's [size, mtime_ns] per row) a file whose size and
    modification time are unchanged is taken as unchanged (stat only: cheap enough for every
    load); every other file is hashed. Without it every file is hashed (``cache verify``).
    Artworks no longer in the catalog are not checked: nothing will ask for them.
    """
    import pandas as pd

    from mmart.data.contract import locate, short
    from mmart.vision.images import ImageRefused, read_image_file

    frame = pd.read_parquet(Path(data_dir) / "artworks.parquet", columns=["artwork_id", "path"])
    path_of = dict(zip(frame["artwork_id"].astype(str), frame["path"]))
    root = os.path.realpath(data_dir)
    changed = []
    for i, (aid, sha) in enumerate(zip(artwork_ids, image_sha256)):
        if aid not in path_of:
            continue
        rel = path_of[aid]
        found = locate(root, rel)
        if found.path is None:
            changed.append(f"{aid} ({short(str(rel))}): {found.problem}")
            continue
        if image_stat is not None and image_stat[i] is not None:
            try:
                st = os.stat(found.path)
                if [st.st_size, st.st_mtime_ns] == list(image_stat[i]):
                    continue
            except OSError:
                pass  # reported by the read below
        try:
            data, _ = read_image_file(found.path)
        except ImageRefused as e:
            changed.append(f"{aid} ({short(str(rel))}): {e.reason}")
            continue
        if hashlib.sha256(data).hexdigest() != sha:
            changed.append(f"{aid} ({short(str(rel))}): image changed since the cache was built (sha256 differs)")
    return changed


def _listed(lines: list[str], n: int = 5) -> str:
    """The first ``n`` lines joined into one, and how many more."""
    more = f"; and {len(lines) - n} more" if len(lines) > n else ""
    return "; ".join(lines[:n]) + more


def _shard_disagrees(manifest: dict[str, Any], shard: dict[str, Any], emb: torch.Tensor) -> str | None:
    """What in one read shard disagrees with the manifest (its [T, D], dtype, its listed row count), or None."""
    dtype = str(emb.dtype).removeprefix("torch.")
    if list(emb.shape[1:]) != manifest["shape"][1:] or dtype != manifest["dtype"]:
        return (f"{shard['file']}: shape {list(emb.shape)} / {dtype} differ from the manifest's "
                f"[N, {', '.join(map(str, manifest['shape'][1:]))}] / {manifest['dtype']}")
    if "rows" in shard and shard["rows"] != emb.shape[0]:
        return f"{shard['file']}: {emb.shape[0]} rows, the manifest lists {shard['rows']!r}"
    return None


def _rows_disagree(manifest: dict[str, Any], ids: list[str], shas: list[str]) -> str | None:
    """What in the shards' rows (their ids and image sha256, in shard order) disagrees with the manifest, or None.

    ``cache verify`` and :meth:`ArtworkCache.load` both ask this, so a manifest one refuses the other refuses too.
    """
    if len(ids) != manifest["shape"][0] or len(ids) != len(manifest["artwork_ids"]):
        return (f"{len(ids)} rows in shards, the manifest says {manifest['shape'][0]} (shape) and lists "
                f"{len(manifest['artwork_ids'])} artwork ids")
    if ids != manifest["artwork_ids"]:  # a row is only the vector of the id its shard recorded
        row = next(i for i, (a, b) in enumerate(zip(manifest["artwork_ids"], ids)) if a != b)
        return (f"its artwork id order differs from the shards' own ids (row {row}: manifest "
                f"{manifest['artwork_ids'][row]!r}, shard {ids[row]!r}), so vectors would be mismapped")
    if shas != manifest["image_sha256"]:
        row = next(i for i, (a, b) in enumerate(zip(manifest["image_sha256"], shas)) if a != b)
        return f"the shards' image sha256 differ from the manifest's (row {row}, artwork {ids[row]!r})"
    return None


def verify_cache(cache_dir: str | Path, data_dir: str | Path | None = None) -> list[str]:
    """Every problem of a built cache (missing or altered shard, shape or id mismatch); empty = sound.

    With ``data_dir`` every artwork image is hashed and compared with the sha256 its row was
    encoded from, so images replaced since the build are problems too.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    problems, ids, shas = [], [], []
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
        shas += meta["image_sha256"]
        problem = _shard_disagrees(manifest, shard, emb)
        if problem:
            problems.append(problem)
    if not problems:
        problems += [p for p in [_rows_disagree(manifest, ids, shas)] if p]
    if not problems and data_dir is not None:
        changed = changed_images(data_dir, ids, shas)
        problems += [f"{line}; run `mmart cache build` to re-encode it" for line in changed[:MAX_LISTED]]
        if len(changed) > MAX_LISTED:
            problems.append(f"... and {len(changed) - MAX_LISTED} more artwork image(s) changed since the build")
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
             expect: Fingerprint | VisionConfig | None = None, tokens_per_artwork: int | None = None,
             data_dir: str | Path | None = None, check_images: bool = True) -> "ArtworkCache":
        """Load, verify checksums and (with ``expect``) check the cache was built by the tower asked for.

        ``expect`` is a tower fingerprint or a :class:`VisionConfig`; a cache built with another
        architecture, weights, pretrained tag or preprocessing is refused, naming each difference.
        The manifest's row order is checked against the ids each shard records, and (with
        ``check_images``) every artwork image of ``data_dir`` (default: the dataset the cache
        was built from, when that folder exists) against the sha256 its row was encoded from:
        stat first, hashing only files whose size or mtime changed. Either mismatch is refused.
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
        parts, shard_ids, shard_shas = [], [], []
        for shard in manifest["shards"]:
            path = cache_dir / shard["file"]
            if not path.is_file():
                raise CacheError(f"{path} is missing; rebuild the cache with `mmart cache build` (it resumes)")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise CacheError(f"{path}: sha256 differs from {MANIFEST} (the file changed or is corrupt); delete it "
                                 "and run `mmart cache build` again to re-encode its artworks")
            try:
                meta, emb = read_shard(path, data)
            except ValueError as e:
                raise CacheError(f"{path}: {e}") from e
            problem = _shard_disagrees(manifest, shard, emb)
            if problem:
                raise CacheError(f"{cache_dir}: {problem}; run `mmart cache build` on this folder to rewrite the "
                                 "manifest from the shards")
            parts.append(emb)
            shard_ids += meta["artwork_ids"]
            shard_shas += meta["image_sha256"]
        dim_shape = manifest["shape"][1:]
        emb = torch.cat(parts) if parts else torch.empty(0, *dim_shape, dtype=DTYPES[manifest["dtype"]])
        ids = manifest["artwork_ids"]
        problem = _rows_disagree(manifest, shard_ids, shard_shas)
        if problem:
            raise CacheError(f"{cache_dir / MANIFEST}: {problem}; run `mmart cache build` on this folder to rewrite "
                             "the manifest from the shards")
        dataset = manifest_dataset(manifest, data_dir) if check_images else None
        if dataset is not None:
            changed = changed_images(dataset, ids, shard_shas, manifest["image_stat"])
            if changed:
                raise CacheError(f"cache {cache_dir}: {len(changed)} artwork image(s) in {dataset} changed since the "
                                 f"build: {_listed(changed)}. Run `mmart cache build --data {dataset} --out {cache_dir}` "
                                 "(it re-encodes only the shards holding them)")
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
                 dtype: str, tokens: int, dim: int, bad: list[dict[str, str]], dataset: str,
                 stats: dict[str, tuple[str, list[int]]] | None = None) -> dict[str, Any]:
    """The manifest of the shards now on disk (row order = shard index order).

    ``stats`` maps an artwork id to (sha256, [size, mtime_ns]) of its image as hashed when the
    build planned; a row records that stat only when the sha256 matches the one it was encoded
    from, so a stat-only check at load time can never vouch for other bytes.
    """
    stats = stats or {}
    ids = [a for s in shards for a in s.artwork_ids]
    shas = [h for s in shards for h in s.image_sha256]
    return {
        "format": FORMAT, "version": VERSION,
        "fingerprint": fingerprint, "fingerprint_sha256": fingerprint_sha,
        "dtype": dtype, "shape": [len(ids), tokens, dim], "tokens_per_artwork": tokens,
        "artwork_ids": ids,
        "image_sha256": shas,
        "image_stat": [stats[a][1] if a in stats and stats[a][0] == h else None for a, h in zip(ids, shas)],
        "shards": [{"file": s.file, "rows": len(s.artwork_ids), "sha256": sha256_file(cache_dir / s.file)}
                   for s in shards],
        "bad": bad,
        "dataset": dataset,
    }


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(cache_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
