"""Typed configs: nested dataclasses loaded from YAML, with dotted CLI overrides.

HfArgumentParser / TrlParser handle flat dataclasses well but not nested sections
(``world.num_titles``), which a pipeline config needs; this module does only that
part, and rejects unknown keys and wrong types with the file and key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from mmart.errors import UserError

T = TypeVar("T")

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A config file or override that does not match its dataclass."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, base_dir: Path | None) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, base_dir)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, (str, Path)):
            # A section may name another YAML file (relative to the including file, then configs/).
            return _from_file(tp, _resolve_include(str(value), base_dir), prefix=where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, where, base_dir)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    return value


def _resolve_include(name: str, base_dir: Path | None) -> Path:
    candidates = [Path(name)]
    if base_dir is not None:
        candidates.insert(0, base_dir / name)
    candidates.append(CONFIG_ROOT / name)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config include {name!r} not found (looked in {', '.join(str(c) for c in candidates)})")


def _from_dict(cls: type[T], data: dict, where: str, base_dir: Path | None) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{where}: unknown key {k!r}{hint} Known keys of {cls.__name__}: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k, base_dir) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return obj


INHERIT_KEY = "inherit"


def _read_mapping(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping, with ``inherit: other.yaml`` resolved: this file's keys deep-merged over the other's."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    base_path = _resolve_include(str(parent), Path(path).parent)
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: 'inherit' loops back to {base_path}")
    return _merge(_read_mapping(base_path, (*seen, Path(path).resolve())), data, base_path.parent)


def _merge(base: dict, over: dict, base_dir: Path) -> dict:
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        if isinstance(v, dict) and isinstance(b, str) and b.endswith((".yaml", ".yml")):
            b = _read_mapping(_resolve_include(b, base_dir))  # an included section, refined key by key
        out[k] = _merge(b, v, base_dir) if isinstance(v, dict) and isinstance(b, dict) else v
    return out


def _from_file(cls: type[T], path: Path, prefix: str = "") -> T:
    data = _read_mapping(Path(path))
    return _from_dict(cls, data, f"{path}" + (f" ({prefix})" if prefix else ""), Path(path).parent)


def from_dict(cls: type[T], data: dict, source: str = "") -> T:
    """Build ``cls`` from a plain dict (e.g. a saved pipeline.yaml), with the same checks as a file."""
    return _from_dict(cls, data, source, None)


def apply_overrides(obj: T, overrides: list[str]) -> T:
    """Return a copy of ``obj`` with ``a.b.c=value`` overrides applied (value parsed as YAML)."""
    data = to_dict(obj)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. num_titles=50")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            close = difflib.get_close_matches(parts[-1], list(node), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}{hint}")
        node[parts[-1]] = yaml.safe_load(raw)
    return _from_dict(type(obj), data, "overrides", None)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (defaults when ``path`` is None), then apply overrides."""
    obj = _from_file(cls, Path(path)) if path is not None else cls()
    return apply_overrides(obj, overrides) if overrides else obj


def to_dict(obj: Any) -> Any:
    """A plain (YAML/JSON-ready) dict of a config, recursively."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --- The pipeline config: one section per stage (each section's dataclass lives beside its stage). ---

from mmart.data.world.config import WorldConfig  # noqa: E402
from mmart.examples import PromptConfig  # noqa: E402
from mmart.train.config import DPOStageConfig, EvalConfig, ModelConfig, SFTStageConfig  # noqa: E402
from mmart.vision.config import CacheConfig, VisionConfig  # noqa: E402


@dataclasses.dataclass
class PipelineConfig:
    """What ``scripts/train.sh`` runs; a section may be given inline or as a path to a section YAML."""

    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    data_dir: str = dataclasses.field(default="data/world", metadata={"help": "Dataset folder (the contract)."})
    output_dir: str = dataclasses.field(default="outputs/default", metadata={"help": "Caches, checkpoints, reports."})
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig, metadata={
        "help": "The open_clip tower that encodes artworks (configs/vision/*.yaml)."})
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig, metadata={
        "help": "How `mmart cache build` encodes and stores the artwork vectors."})
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig, metadata={
        "help": "How a decision is rendered for the LLM (history, candidates, artwork slots or captions)."})
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "LLM, projector, LoRA."})
    sft: SFTStageConfig = dataclasses.field(default_factory=SFTStageConfig, metadata={"help": "Supervised fine-tuning."})
    dpo: DPOStageConfig = dataclasses.field(default_factory=DPOStageConfig, metadata={"help": "Preference tuning."})
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig, metadata={"help": "Scoring and the report."})

    @property
    def cache_dir(self) -> str:
        return self.cache.dir or f"{self.output_dir}/cache"


# Which dataclass a YAML under configs/ holds, by its folder (top-level files are pipeline configs).
# configs/accelerate/ holds accelerate's own files, checked by accelerate's loader instead.
CONFIG_KINDS: dict[str, str] = {
    "": "mmart.config:PipelineConfig",
    "world": "mmart.data.world.config:WorldConfig",
    "vision": "mmart.vision.config:VisionConfig",
}


def config_class_for(path: str | Path) -> type:
    """The dataclass for a YAML under configs/, from its folder name."""
    import importlib

    rel = Path(path).resolve().relative_to(CONFIG_ROOT)
    kind = rel.parts[0] if len(rel.parts) > 1 else ""
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"{path}: no config kind for folder {kind!r}; known: {sorted(CONFIG_KINDS)}")
    module, name = CONFIG_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)
