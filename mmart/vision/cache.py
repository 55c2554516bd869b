"""``mmart cache build``: encode every artwork once into safetensors shards, resumably, on 1..N processes.

Run as: ``mmart cache build --vision configs/vision/default.yaml --data data/world``
(multi-process: ``accelerate launch --config_file configs/accelerate/<name>.yaml -m mmart.cli cache build ...``)

Planning is deterministic, so every process derives the same plan from the same disk
state: the artworks not yet in a valid shard, in catalog order, cut into ``shard_size``
chunks that take the smallest free shard indices. Every image is hashed first (sha256 of
its bytes); a shard holding an artwork whose image changed since it was encoded is
discarded and its artworks encoded again, so a kept row always matches today's image.
Process ``r`` of ``n`` encodes chunks ``r, r+n, ...``; batches never straddle a shard, so a
shard's bytes do not depend on which process encoded it, nor on whether an earlier run was
killed. The main process writes the manifest once every process is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmart.artefacts import stale_tmp
from mmart.errors import UserError
from mmart.vision.config import CacheConfig, VisionConfig
from mmart.vision.images import (ArtworkImages, ArtworkItem, BadImage, ImageRefused, catalog_items, collate,
                                 image_fingerprint, keep_freed_memory)
from mmart.vision.store import (DTYPES, MANIFEST, CacheError, ShardInfo, manifest_for, read_manifest, scan_shards,
                                shard_name, write_manifest, write_shard)
from mmart.vision.tower import (Tower, encode_images, fingerprint_differences, fingerprint_sha, load_tower,
                                split_preprocess)

MAX_LISTED = 50


class BadImagesError(UserError):
    """Unreadable artwork images; ``bad`` lists every one."""

    def __init__(self, bad: list[BadImage]):
        self.bad = bad
        shown = "\n".join(f"  - {b}" for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        super().__init__(f"{len(bad)} artwork image(s) cannot be read:\n{shown}{more}\n"
                         "Fix or replace them and run the build again (finished shards are kept), or pass --skip-bad "
                         "to record them in the manifest (using those artworks later fails with this reason).")


@dataclasses.dataclass
class BuildReport:
    cache_dir: str
    rows: int  # rows in the cache after this build
    encoded: int  # artworks encoded by this run (all processes)
    kept: int  # rows found in shards from earlier runs
    shards_written: int
    bad: list[BadImage]
    encode_seconds: float
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0


def cache_fingerprint(tower: Tower, cache: CacheConfig) -> dict[str, Any]:
    """The tower's fingerprint plus what else changes the stored bytes."""
    return {**tower.fingerprint, "tokens_per_artwork": cache.tokens_per_artwork, "normalize": cache.normalize,
            "dtype": cache.dtype}


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the block with ``n`` torch threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cores(num_processes: int = 1) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // num_processes)


def auto_workers(cache: CacheConfig, num_processes: int = 1) -> int:
    """DataLoader workers per process: the config's, or (-1) one per core but one, at most 8.

    With the torch threads set to the cores the workers leave, a 2-core machine runs one
    decoding worker beside one encoding thread: never two OpenMP threads competing for a core
    (OpenMP threads spin-waiting on a busy core slow everything on it down).
    """
    return cache.num_workers if cache.num_workers >= 0 else min(8, max(1, _cores(num_processes) - 1))


def auto_cpu_threads(cache: CacheConfig, num_processes: int = 1) -> int:
    """torch threads per process: the cores its workers leave (oversubscribed OpenMP threads spin and wait)."""
    return cache.cpu_threads or max(1, _cores(num_processes) - auto_workers(cache, num_processes))


def _all(state: Any, value: Any) -> list[Any]:
    """``value`` from every process (one-element list when not distributed)."""
    from accelerate.utils import gather_object

    return gather_object([value]) if state.num_processes > 1 else [value]


def hash_images(items: Sequence[ArtworkItem], state: Any) -> dict[str, tuple[str, list[int]]]:
    """artwork id -> (sha256 of its image file, [size, mtime_ns]) for every readable image; processes split the work.

    Unreadable images are left out: the encode pass reports them with their reason.
    """
    mine = {}
    for it in items[state.process_index::state.num_processes]:
        if it.path is None:
            continue
        try:
            mine[it.artwork_id] = image_fingerprint(it.path)
        except ImageRefused:
            continue
    return {a: v for part in _all(state, mine) for a, v in part.items()}


def _stale_shards(shards: list[ShardInfo], current: dict[str, tuple[str, list[int]]],
                  catalog: set[str]) -> list[tuple[ShardInfo, list[str]]]:
    """Shards holding an artwork of the catalog whose image is not the one encoded (changed or now unreadable)."""
    out = []
    for s in shards:
        changed = [a for a, h in zip(s.artwork_ids, s.image_sha256)
                   if a in catalog and (a not in current or current[a][0] != h)]
        if changed:
            out.append((s, changed))
    return out


def _prepare_dir(cache_dir: Path, fp: dict[str, Any], fp_sha: str, overwrite: bool,
                 current: dict[str, tuple[str, list[int]]], catalog: set[str]) -> str | None:
    """Main process only: clean temp files and stale shards, refuse (or with ``overwrite`` clear) another tower's cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for tmp in cache_dir.glob("*.tmp-*"):  # left by a killed build: never a complete file
        if stale_tmp(tmp):
            tmp.unlink(missing_ok=True)
    if overwrite:
        (cache_dir / MANIFEST).unlink(missing_ok=True)
        for shard in cache_dir.glob("shard-*.safetensors"):
            shard.unlink(missing_ok=True)
        return None
    shards, invalid = scan_shards(cache_dir)
    for name, problem in invalid:  # a shard that fails its own hash is re-encoded, not trusted
        print(f"cache: discarding {name} ({problem}); its artworks will be encoded again")
        (cache_dir / name).unlink(missing_ok=True)
    foreign = [s for s in shards if s.fingerprint_sha != fp_sha]
    if not foreign:
        for s, changed in _stale_shards(shards, current, catalog):
            print(f"cache: discarding {s.file}: {len(changed)} of its artworks' images changed since it was built "
                  f"(e.g. {changed[0]}); its {len(s.artwork_ids)} artworks will be encoded again")
            (cache_dir / s.file).unlink(missing_ok=True)
        return None
    try:
        diffs = fingerprint_differences(read_manifest(cache_dir)["fingerprint"], fp)
    except CacheError:
        diffs = []
    return (f"{cache_dir} holds {len(foreign)} shard(s) built with other settings"
            + (":\n  - " + "\n  - ".join(diffs) if diffs else "")
            + "\nPass --overwrite to rebuild it from scratch, or choose another --out.")


def plan_shards(items: Sequence[ArtworkItem], existing: list[ShardInfo], shard_size: int) -> list[tuple[int, list[ArtworkItem]]]:
    """(shard index, items) for every artwork not in an existing shard, using the smallest free indices."""
    done = {a for s in existing for a in s.artwork_ids}
    pending = [it for it in items if it.artwork_id not in done]
    used = {s.index for s in existing}
    plan, index = [], 0
    for start in range(0, len(pending), shard_size):
        while index in used:
            index += 1
        plan.append((index, pending[start:start + shard_size]))
        index += 1
    return plan


def build_cache(data_dir: str | Path, cache_dir: str | Path, vision: VisionConfig, cache: CacheConfig, *,
                overwrite: bool = False, progress: bool = True, only_ids: Sequence[str] | None = None,
                tower: Tower | None = None, on_shard_written: Callable[[int], None] | None = None) -> BuildReport:
    """Encode every artwork of the dataset at ``data_dir`` not yet in ``cache_dir``; write the manifest.

    ``only_ids`` restricts the build to some artworks (benchmarks); ``tower`` reuses a loaded
    tower; ``on_shard_written(index)`` is called after each shard is safely on disk (tests use
    it to kill a build part-way).
    """
    from mmart.distributed import distributed_state

    from mmart.data.contract import load_contract

    start = time.perf_counter()
    state = distributed_state()
    device = state.device if cache.device == "auto" else torch.device(cache.device)
    if device.type == "cpu":
        keep_freed_memory()
    cache_dir = Path(cache_dir)
    items = catalog_items(load_contract(data_dir, check=False), only_ids)
    tower = tower or load_tower(vision, device)
    fp = cache_fingerprint(tower, cache)
    fp_sha = fingerprint_sha(fp)

    current = hash_images(items, state)
    catalog = {it.artwork_id for it in items}
    problem = _prepare_dir(cache_dir, fp, fp_sha, overwrite, current, catalog) if state.is_main_process else None
    problem = next((p for p in _all(state, problem) if p), None)
    if problem:
        raise CacheError(problem)
    state.wait_for_everyone()
    existing, _ = scan_shards(cache_dir)
    plan = plan_shards(items, existing, cache.shard_size)
    state.wait_for_everyone()  # nobody writes until every process has planned from the same disk state

    threads = (cpu_threads(auto_cpu_threads(cache, state.num_processes)) if device.type == "cpu"
               else contextlib.nullcontext())
    t0 = time.perf_counter()
    with threads:
        bad, written, encoded = _encode_shards(plan[state.process_index::state.num_processes], cache_dir, tower,
                                               cache, device, fp_sha, on_shard_written,
                                               progress and state.is_main_process, state)
    encode_seconds = time.perf_counter() - t0

    results = _all(state, (bad, written, encoded, encode_seconds))
    all_bad = sorted((b for r in results for b in r[0]), key=lambda b: b.artwork_id)
    if all_bad and not cache.skip_bad:
        raise BadImagesError(all_bad) if state.is_main_process else UserError("bad images (listed by process 0)")
    rows = 0
    if state.is_main_process:
        shards, _ = scan_shards(cache_dir)
        dim = _dim_of(cache_dir, shards) if shards else 0
        manifest = manifest_for(cache_dir, shards, fp, fp_sha, cache.dtype, cache.tokens_per_artwork, dim,
                                [dataclasses.asdict(b) for b in all_bad], str(data_dir), current)
        write_manifest(cache_dir, manifest)
        rows = manifest["shape"][0]
    state.wait_for_everyone()
    return BuildReport(str(cache_dir), rows, sum(r[2] for r in results), sum(len(s.artwork_ids) for s in existing),
                       sum(r[1] for r in results), all_bad, max(r[3] for r in results), time.perf_counter() - start)


def _encode_shards(mine: list[tuple[int, list[ArtworkItem]]], cache_dir: Path, tower: Tower, cache: CacheConfig,
                   device: torch.device, fp_sha: str, on_shard_written: Callable[[int], None] | None,
                   progress: bool, state: Any) -> tuple[list[BadImage], int, int]:
    """Encode this process's shards; returns (bad images, shards written, artworks encoded).

    After the first bad image (without ``skip_bad``) it keeps decoding, to list every bad
    image, but stops encoding and writing: the shards finished before it stay valid.
    """
    from tqdm.auto import tqdm

    flat = [it for _, chunk in mine for it in chunk]
    batches: list[tuple[int, list[int], bool]] = []  # (shard index, positions in flat, last batch of its shard)
    offset = 0
    for index, chunk in mine:
        for s in range(0, len(chunk), cache.batch_size):
            batches.append((index, list(range(offset + s, offset + min(s + cache.batch_size, len(chunk)))),
                            s + cache.batch_size >= len(chunk)))
        offset += len(chunk)
    worker_tf, device_tf = (split_preprocess(tower.preprocess) if device.type == "cuda" and cache.gpu_normalize
                            else (tower.preprocess, None))
    loader = torch.utils.data.DataLoader(
        ArtworkImages(flat, worker_tf), batch_sampler=[b[1] for b in batches], collate_fn=collate,
        num_workers=auto_workers(cache, state.num_processes) if flat else 0, pin_memory=device.type == "cuda")
    model = tower.model.to(memory_format=torch.channels_last) if device.type == "cuda" else tower.model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
                if device.type == "cuda" else contextlib.nullcontext())
    store_dtype = DTYPES[cache.dtype]
    bad: list[BadImage] = []
    failing, written, encoded = False, 0, 0
    buf_emb: list[torch.Tensor] = []
    buf_ids: list[str] = []
    buf_sha: list[str] = []  # sha256 of the bytes each vector was computed from
    bar = tqdm(total=len(flat), unit="img", desc=f"cache build [{state.process_index}/{state.num_processes}]",
               disable=not progress)
    for (index, _, last), batch in zip(batches, loader):
        for pos, reason in batch["bad"]:
            bad.append(BadImage(flat[pos].artwork_id, flat[pos].rel_path, reason))
            failing = failing or not cache.skip_bad
        if not failing and batch["pixels"] is not None:
            x = batch["pixels"].to(device, non_blocking=True)
            if device_tf is not None:
                x = device_tf(x)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast:
                emb = encode_images(model, x, cache.tokens_per_artwork, cache.normalize)
            buf_emb.append(emb.to(store_dtype))  # stays on the device until its shard is written: no per-batch sync
            buf_ids += [flat[p].artwork_id for p in batch["positions"]]
            buf_sha += batch["sha256"]
        if last:
            if not failing and buf_ids:
                write_shard(cache_dir / shard_name(index), torch.cat(buf_emb), buf_ids, buf_sha, fp_sha)
                written, encoded = written + 1, encoded + len(buf_ids)
                if on_shard_written is not None:
                    on_shard_written(index)
            buf_emb, buf_ids, buf_sha = [], [], []
        bar.update(len(batch["positions"]) + len(batch["bad"]))
    bar.close()
    return bad, written, encoded


def _dim_of(cache_dir: Path, shards: list[ShardInfo]) -> int:
    from safetensors import safe_open

    with safe_open(str(cache_dir / shards[0].file), framework="pt") as f:
        return int(f.get_slice("embeddings").get_shape()[-1])
