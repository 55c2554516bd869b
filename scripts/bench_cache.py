"""Benchmark: ``mmart cache build`` vs a plain loop (PIL open, preprocess, ``encode_image`` one image at a time).

Run as: ``python scripts/bench_cache.py [--data data/world] [--n 500] [--repeats 3] [--device auto|cpu|cuda]``

Both ways encode the same artworks with the same loaded tower in one process; the
repeats are interleaved so a noisy neighbour slows both alike. The cache side is the
whole ``build_cache`` call (DataLoader workers start-up, shard and manifest writes
included); the tower load is outside both timings. Prints a table of median images/s
and writes JSON to ``outputs/bench/``. Goal (docs/launching.md): >= 3x on a 2-core CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see scripts/build_cache.sh

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def plain_loop(tower, paths: list[Path], device: str):
    """What one would write without the cache code: one image at a time, torch's default threads."""
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for p in paths:
            x = tower.preprocess(Image.open(p).convert("RGB")).unsqueeze(0).to(device)
            out.append(torch.nn.functional.normalize(tower.model.encode_image(x), dim=-1))
    return torch.cat(out).cpu()  # on a GPU, waits for the last encode: the timing covers all of them


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/world")
    ap.add_argument("--vision", default="configs/vision/default.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the vision/cache sections")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where both ways encode: auto = cuda when a GPU is present, else cpu")
    ap.add_argument("--out", default="outputs/bench/cache_build.json")
    args = ap.parse_args()

    import torch

    from mmart.config import PipelineConfig, apply_overrides, load_config
    from mmart.data.contract import load_contract
    from mmart.vision.cache import auto_cpu_threads, auto_workers, build_cache
    from mmart.vision.config import VisionConfig
    from mmart.vision.images import catalog_items, keep_freed_memory
    from mmart.vision.store import ArtworkCache
    from mmart.vision.tower import load_tower

    keep_freed_memory()
    cfg = PipelineConfig()
    cfg.vision = load_config(VisionConfig, args.vision)
    cfg = apply_overrides(cfg, args.set) if args.set else cfg
    cfg.vision = cfg.tower  # {output_dir} in vision.checkpoint: the default run's folder unless --set output_dir=...
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg.cache.device = device
    items = catalog_items(load_contract(args.data, check=False))[: args.n]
    ids, paths = [it.artwork_id for it in items], [it.path for it in items]
    tower = load_tower(cfg.vision, device)
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()

    # The other placement of decoding: in 1 worker if the default decodes in the main process, else in the main.
    other = dataclasses.replace(cfg.cache, num_workers=1 if auto_workers(cfg.cache) == 0 else 0)
    cache_s, cache0_s, plain_s, plain1_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            t = time.perf_counter()
            build_cache(args.data, Path(tmp) / f"c{r}", cfg.vision, cfg.cache, only_ids=ids, tower=tower,
                        progress=False)
            cache_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            build_cache(args.data, Path(tmp) / f"m{r}", cfg.vision, other, only_ids=ids, tower=tower,
                        progress=False)
            cache0_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain = plain_loop(tower, paths, device)
            plain_s.append(time.perf_counter() - t)
            torch.set_num_threads(1)  # the plain loop's best case on a busy 2-core machine
            t = time.perf_counter()
            plain_loop(tower, paths, device)
            plain1_s.append(time.perf_counter() - t)
            torch.set_num_threads(default_threads)
        cached = ArtworkCache.load(Path(tmp) / "c0")
        max_diff = float((cached.gather(ids)[:, 0].float() - plain).abs().max())

    n = len(ids)
    workers, threads = auto_workers(cfg.cache), auto_cpu_threads(cfg.cache)
    rows = {
        f"mmart cache build (batch {cfg.cache.batch_size}, {workers} worker(s), {threads} thread(s))":
            n / statistics.median(cache_s),
        f"  same, {other.num_workers} worker(s), {auto_cpu_threads(other)} thread(s)": n / statistics.median(cache0_s),
        f"plain loop ({default_threads} threads, torch default)": n / statistics.median(plain_s),
        "plain loop (1 thread)": n / statistics.median(plain1_s),
    }
    best_plain = max(list(rows.values())[2:])
    ratio = list(rows.values())[0] / best_plain
    print(f"{n} artworks of {args.data}, tower {cfg.vision.model} on {device}, {args.repeats} interleaved repeats, "
          f"{os.cpu_count()} CPUs, load average before {load_before[0]:.2f}")
    print(f"{'method':<58} {'images/s':>9}")
    for name, ips in rows.items():
        print(f"{name:<58} {ips:>9.1f}")
    print(f"{'ratio: cache build (default) / best plain loop':<58} {ratio:>8.2f}x   (goal >= 3x)")
    print(f"max |cache - plain| over the {n} embeddings: {max_diff:.2e}")
    result = {
        "n": n, "data": args.data, "device": device, "model": cfg.vision.model, "checkpoint": cfg.vision.checkpoint,
        "batch_size": cfg.cache.batch_size, "num_workers": workers, "cpu_threads": threads, "repeats": args.repeats,
        "seconds": {"cache_build": cache_s, "cache_build_other_workers": cache0_s,
                    "plain_default_threads": plain_s, "plain_1_thread": plain1_s},
        "images_per_second": rows, "ratio_vs_best_plain": ratio, "max_abs_diff": max_diff,
        "cpus": os.cpu_count(), "torch_threads_default": default_threads, "torch": torch.__version__,
        "platform": platform.platform(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
