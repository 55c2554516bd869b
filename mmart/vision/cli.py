"""``mmart vision adapt`` and ``mmart cache build|info|verify|probe``.

Run as: ``mmart cache --help``. Configs: ``--config`` (a pipeline YAML with ``vision`` and
``cache`` sections), ``--vision`` (a vision section YAML, e.g. configs/vision/default.yaml,
replacing the pipeline's), then ``--set section.key=value`` overrides. torch and open_clip are
imported inside the handlers so ``mmart --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mmart.config_checks import at_least, cli_number, seeds


def _config_args(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--config", default=None, help="pipeline config YAML (default: built-in defaults)")
    p.add_argument("--vision", default=None, help="vision section YAML replacing the config's, e.g. configs/vision/default.yaml")
    if data:
        p.add_argument("--data", default=None, help="dataset folder (default: the config's data_dir)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. --set cache.batch_size=128 vision.model=ViT-B-32")


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "vision", help="the vision tower: adapt the default tower to the catalog",
        description="The open_clip vision tower that encodes artworks. `mmart vision adapt` trains the embedded "
                    "default (a tiny registered ViT) contrastively on the catalog's artworks and their captions and "
                    "tags; the real configuration (configs/vision/vit_l14_laion.yaml) needs no adaptation.")
    v.set_defaults(func=lambda _args: _usage(v))
    vsub = v.add_subparsers(dest="vision_cmd", metavar="<command>")
    a = vsub.add_parser(
        "adapt", help="short contrastive training of the tower on the catalog's (artwork, caption+tags) pairs",
        description="Train the config's open_clip architecture (from its pretrained tag, else a seeded init) with "
                    "ClipLoss on the dataset's (artwork, caption + tags) pairs and save it as safetensors at "
                    "vision.checkpoint. About a minute on 2 CPU cores for the default world. "
                    "Example: mmart vision adapt --vision configs/vision/default.yaml --data data/world")
    _config_args(a)
    a.add_argument("--out", default=None, help="checkpoint to write (default: vision.checkpoint)")
    a.add_argument("--if-stale", action="store_true",
                   help="keep the checkpoint when it was adapted on this very catalog (artworks table and image bytes) "
                        "with these settings (its safetensors metadata records both); adapt again otherwise")
    a.add_argument("--num-workers", type=cli_number(int, at_least, 0), default=2, help="DataLoader workers decoding images")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a.set_defaults(func=_adapt)

    c = sub.add_parser(
        "cache", help="the artwork embedding cache: build, info, verify, probe",
        description="Encode every artwork once with the vision tower into [num_artworks, tokens_per_artwork, dim] "
                    "(safetensors shards + manifest.json); training and scoring then read rows of one "
                    "device-resident tensor and never run the tower. Example: bash scripts/build_cache.sh")
    c.set_defaults(func=lambda _args: _usage(c))
    csub = c.add_subparsers(dest="cache_cmd", metavar="<command>")
    b = csub.add_parser(
        "build", help="encode every artwork once into safetensors shards + manifest.json (resumable)",
        description="Encode every artwork of the dataset with the vision tower into <cache dir>/shard-*.safetensors "
                    "and manifest.json. Reruns resume (finished shards kept) and encode only new artworks. "
                    "Multi-process: accelerate launch --config_file configs/accelerate/<name>.yaml -m mmart.cli "
                    "cache build ... Example: mmart cache build --vision configs/vision/default.yaml --data data/world")
    _config_args(b)
    b.add_argument("--out", default=None, help="cache folder (default: cache.dir, else <output_dir>/cache)")
    b.add_argument("--skip-bad", action="store_true",
                   help="record unreadable images in the manifest and continue, instead of stopping with the list")
    b.add_argument("--overwrite", action="store_true", help="delete a cache built with other settings and rebuild")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.set_defaults(func=_build)

    i = csub.add_parser("info", help="print a cache's manifest: tower, preprocessing, dtype, shape, shards, bad images")
    i.add_argument("dir", help="cache folder")
    i.add_argument("--json", action="store_true", help="print the manifest without the id list, as JSON")
    i.set_defaults(func=_info)

    ve = csub.add_parser(
        "verify", help="check every shard's checksum, shape and ids against the manifest, and every image's sha256",
        description="Check every shard against its checksum and the manifest (shape, dtype, artwork ids in row order), "
                    "then hash every artwork image of the dataset (--data, default: the folder the cache was built "
                    "from) and compare it with the sha256 its row was encoded from: an image replaced since the "
                    "build is a problem. Exit 1 on any problem. Example: mmart cache verify outputs/default/cache")
    ve.add_argument("dir", help="cache folder")
    _config_args(ve, data=False)
    ve.add_argument("--data", default=None,
                    help="dataset folder whose images to check (default: the one recorded in the manifest)")
    ve.add_argument("--no-images", action="store_true", help="check the shards only, not the images")
    ve.add_argument("--check-tower", action="store_true",
                    help="also check the cache was built by the tower the config names")
    ve.set_defaults(func=_verify)

    p = csub.add_parser(
        "probe", help="linear probe: predict tags (theme, shot) from cached vectors, 70/30 split",
        description="Fit a logistic regression on a seeded 70% of the cached artworks and report accuracy on the rest, "
                    "per tag family. Bars for the default world: theme >= 0.90, shot >= 0.85. "
                    "Example: mmart cache probe outputs/default/cache --data data/world")
    p.add_argument("dir", nargs="?", default=None, help="cache folder (default: from the config)")
    _config_args(p)
    p.add_argument("--families", nargs="+", default=["theme", "shot"], help="tag families to probe (tag = family:value)")
    p.add_argument("--seed", type=cli_number(int, seeds), default=0, help="seed of the 70/30 split")
    p.add_argument("--strict", action="store_true", help="exit 1 when a probed family misses its bar")
    p.set_defaults(func=_probe)


def _calm_openmp() -> None:
    """Let idle OpenMP threads sleep rather than spin, if torch is not loaded yet (the variable is read then).

    On a machine with few cores and another busy process, spinning threads take the cores the
    training steps and forwards need; sleeping ones cost them nothing.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _load(args: argparse.Namespace) -> Any:
    from mmart.config import PipelineConfig, apply_overrides, load_config
    from mmart.vision.config import VisionConfig

    cfg = load_config(PipelineConfig, args.config)
    if args.vision:
        cfg.vision = load_config(VisionConfig, args.vision)
    cfg = apply_overrides(cfg, args.set) if args.set else cfg
    cfg.vision = cfg.tower  # {output_dir} in vision.checkpoint -> this run's folder
    return cfg


def _cache_dir(cfg: Any, out: str | None) -> str:
    return out or cfg.cache_dir  # cache.dir, else <output_dir>/cache


def _adapt(args: argparse.Namespace) -> int:
    _calm_openmp()
    from pathlib import Path

    from mmart.errors import UserError

    cfg = _load(args)
    out = args.out or cfg.vision.checkpoint
    if not out:
        raise UserError("no checkpoint to write: set vision.checkpoint (e.g. --set vision.checkpoint=outputs/vision/t.safetensors) or pass --out")
    from mmart.artefacts import differences
    from mmart.vision.adapt import adapt_made_from, adapt_tower, adapted_made_from

    data = args.data or cfg.data_dir
    if args.if_stale and Path(out).is_file():
        why = differences(adapted_made_from(out), adapt_made_from(data, cfg.vision))
        if not why:
            print(f"vision adapt: {out} is up to date (adapted on this catalog with these settings); kept")
            return 0
        print(f"vision adapt: {out} must be adapted again ({'; '.join(why)})")

    report = adapt_tower(data, cfg.vision, out, num_workers=args.num_workers,
                         progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 0


def _build(args: argparse.Namespace) -> int:
    _calm_openmp()
    from mmart.vision.cache import build_cache

    cfg = _load(args)
    if args.skip_bad:
        cfg.cache.skip_bad = True
    out = _cache_dir(cfg, args.out)
    r = build_cache(args.data or cfg.data_dir, out, cfg.vision, cfg.cache, overwrite=args.overwrite,
                    progress=not args.no_progress)
    from mmart.distributed import distributed_state

    if distributed_state().is_main_process:
        print(f"cache {out}: {r.rows} artworks; encoded {r.encoded} now ({r.images_per_second:.0f} images/s), "
              f"kept {r.kept} from earlier runs, {r.shards_written} shard(s) written, {r.seconds:.1f} s")
        for b in r.bad:
            print(f"  skipped bad image {b}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from mmart.vision.store import read_manifest

    m = read_manifest(args.dir)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "artwork_ids"}, indent=2))
        return 0
    fp = m["fingerprint"]
    size = sum(s["rows"] for s in m["shards"])
    print(f"cache      {args.dir}")
    print(f"tower      {fp['model']}  pretrained={fp.get('pretrained')}  checkpoint_sha256={fp.get('checkpoint_sha256')}"
          + (f"  init_seed={fp['init_seed']}" if fp.get("init_seed") is not None else ""))
    print(f"preprocess {json.dumps(fp['preprocess'], sort_keys=True)}")
    print(f"tensor     shape={m['shape']} (artworks, tokens_per_artwork, dim)  dtype={m['dtype']}  "
          f"normalize={fp.get('normalize')}")
    print(f"shards     {len(m['shards'])} ({size} rows)")
    print(f"dataset    {m.get('dataset')}")
    print(f"bad images {len(m.get('bad', []))}")
    for b in m.get("bad", [])[:20]:
        print(f"  - {b['artwork_id']} ({b['path']}): {b['reason']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from mmart.errors import UserError
    from mmart.vision.store import ArtworkCache, manifest_dataset, read_manifest, verify_cache

    from mmart.cli import report_problems

    data = None
    if not args.no_images:
        manifest = read_manifest(args.dir)
        data = manifest_dataset(manifest, args.data)
        if data is None and args.data:
            raise UserError(f"--data {args.data}: no artworks.parquet there; pass the dataset folder the cache was built from")
        if data is None:
            print(f"{args.dir}: images not checked: the dataset it was built from ({manifest.get('dataset')}) is not "
                  "there; pass --data DIR")
    if report_problems(args.dir, verify_cache(args.dir, data), "shards verified"):
        return 1
    if args.check_tower:
        cfg = _load(args)
        ArtworkCache.load(args.dir, "cpu", expect=cfg.vision, tokens_per_artwork=cfg.cache.tokens_per_artwork,
                          check_images=False)
    print(f"{args.dir}: ok (every shard matches its checksum; ids and shape match the manifest"
          + (f"; every image in {data} is the one encoded" if data is not None else "")
          + ("; built by the configured tower)" if args.check_tower else ")"))
    return 0


def _probe(args: argparse.Namespace) -> int:
    _calm_openmp()
    from mmart.vision.probe import DEFAULT_BARS, probe_cache

    cfg = _load(args)
    cache_dir = args.dir or _cache_dir(cfg, None)
    data = args.data or cfg.data_dir
    results = probe_cache(cache_dir, data, args.families, seed=args.seed)
    print(f"linear probe on {cache_dir} (labels from {data}/artworks.parquet tags, 70/30 split, seed {args.seed})")
    print(f"{'label':<8} {'accuracy':>8} {'bar':>5} {'majority':>8} {'classes':>7} {'train':>6} {'test':>5}")
    failed = False
    for r in results:
        bar = DEFAULT_BARS.get(r.label)
        ok = bar is None or r.accuracy >= bar
        failed |= not ok
        print(f"{r.label:<8} {r.accuracy:>8.3f} {(f'{bar:.2f}' if bar else '-'):>5} {r.majority:>8.3f} "
              f"{r.classes:>7} {r.train:>6} {r.test:>5}" + ("" if ok else "  BELOW BAR"))
    return 1 if (failed and args.strict) else 0
