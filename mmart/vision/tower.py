"""The vision tower: an open_clip model, its own preprocessing, and a fingerprint of both.

The tower is built only through ``open_clip.create_model_and_transforms`` (an
architecture name with a pretrained tag, or a local checkpoint), and the preprocessing
is the transform open_clip returns with it, never a copy, so the cache and anything
that re-encodes an artwork cannot drift apart. The fingerprint names everything that
changes the vectors (architecture, weights, preprocessing); the cache stores it and
refuses to load under a config that asks for something else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from mmart.errors import UserError
from mmart.vision.config import VisionConfig

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
Fingerprint = dict[str, Any]
# Fingerprint keys compared on load, with the words an error uses for them.
TOWER_KEYS = {"model": "architecture", "arch_sha256": "architecture config", "pretrained": "pretrained tag",
              "checkpoint_sha256": "checkpoint (sha256)", "init_seed": "random-init seed", "preprocess": "preprocessing"}


class _DropRandomInitNotice(logging.Filter):
    def __init__(self, model: str) -> None:
        super().__init__()
        self.message = f"No pretrained weights loaded for model '{model}'"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.message)


@contextmanager
def quiet_random_init(model: str, random_init: bool):
    """open_clip logs "No pretrained weights loaded for model ..." (a root-logger warning) for every tower built
    without a tag or checkpoint; for ``random_init`` mmart asked for exactly that (seeded, recorded in the
    fingerprint), so that one message is dropped while the tower is built. Any other warning still shows."""
    if not random_init:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitNotice(model)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@dataclasses.dataclass
class Tower:
    """A loaded tower: ``model`` (open_clip CLIP, eval mode), ``preprocess`` (PIL -> [3, H, W]) and its fingerprint."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    fingerprint: Fingerprint


def register_models() -> None:
    """Register mmart's architecture JSONs with open_clip (idempotent), so they load like built-in names."""
    import open_clip
    from open_clip import factory

    if MODEL_CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:  # add_model_config appends unconditionally
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively, so a fingerprint compares equal to its JSON round trip."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _normalize_preprocess(pp: dict[str, Any]) -> dict[str, Any]:
    pp = _jsonable(dict(pp))
    if isinstance(pp.get("size"), int):
        pp["size"] = [pp["size"], pp["size"]]
    for k in ("mean", "std"):
        if isinstance(pp.get(k), list):
            pp[k] = [float(x) for x in pp[k]]
    return dict(sorted(pp.items()))


def _weights_kind(path: Path) -> str:
    """``safetensors``, ``numpy`` (.npz/.npy, read without pickle) or what else the file looks like."""
    if path.suffix in (".npz", ".npy"):
        return "numpy"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK"):
        return "torch zip archive (pickle inside)"
    if head[:1] == b"\x80":
        return "pickle"
    return "file of unknown format"


def _checkpoint_path(cfg: VisionConfig) -> Path | None:
    """The local tower checkpoint, if any: it must exist and be safetensors (mmart never unpickles weights)."""
    if not cfg.checkpoint:
        return None
    if "{output_dir}" in cfg.checkpoint:
        raise UserError(f"vision.checkpoint {cfg.checkpoint!r} names the run's {{output_dir}}: load the vision section "
                        "through a pipeline config (--config), or give a plain path")
    path = Path(os.path.expandvars(os.path.expanduser(cfg.checkpoint)))
    if not path.is_file():
        hint = (" Create it with `mmart vision adapt` (or bash scripts/build_cache.sh)."
                if "adapt" in path.name or cfg.model.startswith("mmart-") else "")
        raise UserError(f"vision checkpoint {path} does not exist.{hint} Or set vision.checkpoint=null "
                        f"for a (seeded) random tower.")
    kind = _weights_kind(path)
    if kind not in ("safetensors", "numpy"):
        out = path.with_suffix(".safetensors")
        raise UserError(
            f"vision checkpoint {path} is not safetensors (it is a {kind}); mmart never unpickles weights. Convert "
            f"it once, where you trust the file: python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', weights_only=True); save_file(sd.get('state_dict', sd), '{out}')\" "
            f"then set vision.checkpoint={out}")
    return path


def _model_config(name: str) -> dict[str, Any]:
    import open_clip

    register_models()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        import difflib
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise UserError(f"unknown open_clip architecture {name!r}" + (f"; did you mean {close}?" if close else "")
                        + " (see open_clip.list_models())")
    return model_cfg


def _preprocess_overrides(cfg: VisionConfig) -> dict[str, Any]:
    return {"image_mean": tuple(cfg.image_mean) if cfg.image_mean else None,
            "image_std": tuple(cfg.image_std) if cfg.image_std else None,
            "image_interpolation": cfg.image_interpolation, "image_resize_mode": cfg.image_resize_mode}


def expected_fingerprint(cfg: VisionConfig) -> Fingerprint:
    """The fingerprint a tower built from ``cfg`` will have, without building it (or downloading weights).

    Resolves preprocessing with open_clip's own helpers in the order ``create_model`` uses
    (defaults, then the pretrained tag's config, the tower's image size, then overrides);
    tests check it equals :func:`load_tower`'s fingerprint.
    """
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict, merge_preprocess_kwargs

    model_cfg = _model_config(cfg.model)
    pp = dataclasses.asdict(PreprocessCfg())
    if cfg.pretrained:
        tag_cfg = get_pretrained_cfg(cfg.model, cfg.pretrained)
        if not tag_cfg:
            from open_clip import list_pretrained_tags_by_model
            raise UserError(f"open_clip has no pretrained tag {cfg.pretrained!r} for {cfg.model}; known tags: "
                            f"{list_pretrained_tags_by_model(cfg.model)}")
        pp = merge_preprocess_dict(pp, tag_cfg)
    pp["size"] = model_cfg["vision_cfg"].get("image_size", pp["size"])
    o = _preprocess_overrides(cfg)
    pp = merge_preprocess_dict(pp, merge_preprocess_kwargs(
        {}, mean=o["image_mean"], std=o["image_std"], interpolation=o["image_interpolation"],
        resize_mode=o["image_resize_mode"]))
    ckpt = _checkpoint_path(cfg)
    return {
        "model": cfg.model,
        "arch_sha256": hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest(),
        "pretrained": cfg.pretrained or None,
        "checkpoint_sha256": sha256_file(ckpt) if ckpt else None,
        "init_seed": cfg.init_seed if not (cfg.pretrained or ckpt) else None,
        "preprocess": _normalize_preprocess(pp),
    }


def load_tower(cfg: VisionConfig, device: str | torch.device = "cpu") -> Tower:
    """Build the tower ``cfg`` names with open_clip, on ``device``, in eval mode.

    A random init (no tag, no checkpoint) is seeded with ``cfg.init_seed`` without touching
    the global RNG, so building twice gives the same tower.
    """
    import open_clip

    fingerprint = expected_fingerprint(cfg)  # validates name, tag and checkpoint first, with clear errors
    ckpt = _checkpoint_path(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        try:
            with quiet_random_init(cfg.model, random_init=not cfg.pretrained and not ckpt):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    cfg.model, pretrained=cfg.pretrained or (str(ckpt) if ckpt else None), **_preprocess_overrides(cfg))
        except (RuntimeError, SafetensorError) as e:  # failed downloads, bad state dicts, damaged safetensors
            raise UserError(f"could not load open_clip tower {cfg.model!r} "
                            f"({'tag ' + cfg.pretrained if cfg.pretrained else ckpt or 'random init'}): {e}") from e
    actual = _normalize_preprocess(model.visual.preprocess_cfg)
    if actual != fingerprint["preprocess"]:  # open_clip changed how it resolves preprocessing: refuse to guess
        raise RuntimeError(f"open_clip resolved preprocessing {actual}, mmart expected {fingerprint['preprocess']}; "
                           "update mmart.vision.tower.expected_fingerprint")
    model.eval().requires_grad_(False).to(device)
    return Tower(model=model, preprocess=preprocess, fingerprint=fingerprint)


def split_preprocess(preprocess: Callable[[Any], torch.Tensor]) -> tuple[Callable[[Any], torch.Tensor], Callable | None]:
    """Split open_clip's transform into (PIL -> uint8 [3, H, W], uint8 batch -> normalised float batch).

    On a GPU the DataLoader workers then ship uint8 pixels (4x fewer bytes to pickle, pin and
    copy) and the scaling and ``Normalize`` run on the device, using open_clip's own
    ``Normalize`` object: same arithmetic as ``ToTensor`` (``/ 255``) then ``Normalize``; a
    test checks the two routes agree. Returns ``(preprocess, None)`` for any transform of
    another shape, which then runs whole in the workers.
    """
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return preprocess, None
    normalize = steps[-1]
    to_uint8 = T.Compose(steps[:-2] + [T.PILToTensor()])

    def finish(batch: torch.Tensor) -> torch.Tensor:
        return normalize(batch.float().div_(255))

    return to_uint8, finish


def fingerprint_differences(built: Fingerprint, wanted: Fingerprint) -> list[str]:
    """Human-readable differences between the fingerprint a cache was built with and the one asked for."""
    diffs = []
    for key in sorted(set(built) | set(wanted)):
        a, b = built.get(key), wanted.get(key)
        if a == b:
            continue
        if key == "preprocess" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"preprocessing {k}: cache has {a.get(k)!r}, config asks for {b.get(k)!r}")
        else:
            diffs.append(f"{TOWER_KEYS.get(key, key)}: cache has {a!r}, config asks for {b!r}")
    return diffs


def fingerprint_sha(fp: Fingerprint) -> str:
    return hashlib.sha256(json.dumps(_jsonable(fp), sort_keys=True).encode()).hexdigest()


def encode_images(model: torch.nn.Module, pixels: torch.Tensor, tokens_per_artwork: int = 1,
                  normalize: bool = True) -> torch.Tensor:
    """Encode preprocessed images ``[B, 3, H, W]`` to ``[B, T, D]`` (T = ``tokens_per_artwork``).

    T = 1 is open_clip's ``encode_image`` (the pooled, projected embedding). T = k*k
    average-pools the last block's patch-token grid (after the final norm, via the
    public ``forward_intermediates``) to k x k cells and applies the same projection,
    so every token lives in the pooled embedding's space.
    """
    if tokens_per_artwork == 1:
        out = model.encode_image(pixels)[:, None, :]
    else:
        visual = model.visual
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "proj") or not hasattr(visual, "grid_size"):
            raise UserError(f"tokens_per_artwork={tokens_per_artwork} needs an open_clip VisionTransformer tower "
                            f"(got {type(visual).__name__}); use tokens_per_artwork=1")
        k = math.isqrt(tokens_per_artwork)
        if k > min(visual.grid_size):
            raise UserError(f"tokens_per_artwork={tokens_per_artwork} asks for a {k}x{k} grid but the tower has only "
                            f"{visual.grid_size[0]}x{visual.grid_size[1]} patches")
        grid = visual.forward_intermediates(pixels, indices=1, normalize_intermediates=True,
                                            intermediates_only=True, output_fmt="NCHW")["image_intermediates"][-1]
        out = F.adaptive_avg_pool2d(grid, (k, k)).flatten(2).transpose(1, 2)  # [B, k*k, width]
        if visual.proj is not None:
            out = out @ visual.proj
    return F.normalize(out.float(), dim=-1) if normalize else out.float()
