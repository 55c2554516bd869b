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

from mmart.config_checks import FieldError
from mmart.data.world.config import WorldConfig
from mmart.errors import ConfigError
from mmart.examples import PromptConfig
from mmart.rationale.config import RationaleConfig
from mmart.train.config import DPOStageConfig, EvalConfig, ModelConfig, SFTStageConfig, StageConfig
from mmart.vision.config import CacheConfig, VisionConfig

T = TypeVar("T")

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


# --- YAML: one mapping per file, no duplicate keys. ---


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        self.key, self.line, self.first = key, line, first
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first})")


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: safe_load keeps the last one silently,
    so a second ``lr:`` further down a section (or in ``extra``) would win unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKey(key, line, first[key])
                first[key] = line
            except TypeError:  # an unhashable key: the base constructor names it
                pass
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text (a config file, or one ``--set`` value) refusing duplicate keys, with one-line errors."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{source}:{e.line}: duplicate key {e.key!r} (first on line {e.first}); "
                          "YAML would keep only the last: remove one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


# --- Finding a config file from any working directory. ---


def _config_names(prefix: str) -> list[str]:
    return sorted(prefix + p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIG_ROOT.rglob("*.y*ml"))


def find_config(name: str | Path, base_dir: Path | None = None, what: str = "config") -> Path:
    """A config file by the name a user or a config gives it.

    Looked up relative to ``base_dir`` (the including file's folder), then the working
    directory, then the project's configs/ folder (``configs/default.yaml`` and ``default.yaml``
    both name ``CONFIG_ROOT/default.yaml``), so a stage run from another folder finds the
    shipped configs. A name found nowhere is a one-line error with the nearest shipped name.
    """
    path = Path(name)
    candidates = [base_dir / path] if base_dir is not None else []
    candidates.append(path)
    if not path.is_absolute():
        parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
        if parts:
            candidates.append(CONFIG_ROOT.joinpath(*parts))
    for c in candidates:
        if c.is_file():
            return c
    typed = str(name)
    known = _config_names("configs/" if typed.startswith("configs/") else "")
    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; shipped configs: {', '.join(known)}"
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ConfigError(f"{what} {typed!r} not found (looked for {looked}){hint}")


# --- Dataclasses from mappings. ---


def _at(source: str) -> str:
    return f"{source}: " if source else ""


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, source: str, key: str, base_dir: Path | None) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses.

    ``source`` names the file (or ``--set``) in messages, ``key`` the dotted key (``sft.lr``).
    """
    where = f"{_at(source)}{key}"
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
                return _coerce(value, arg, source, key, base_dir)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, (str, Path)):
            # A section may name another YAML file (relative to the including file, then configs/).
            path = find_config(str(value), base_dir, what=f"{where}: section file")
            return _from_dict(tp, _read_mapping(path), str(path), key, path.parent)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, source, key, base_dir)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, source, f"{key}[{i}]", base_dir) for i, v in enumerate(value)]
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


def section_name(cls: type) -> str:
    """The pipeline section a dataclass fills (``WorldConfig`` -> ``world``); ``""`` for the pipeline itself."""
    for f in dataclasses.fields(PipelineConfig):
        if f.type is cls or typing.get_type_hints(PipelineConfig).get(f.name) is cls:
            return f.name
    return ""


def unknown_key(cls: type, key: str, name: str) -> str:
    """The message for ``name``, not a field of ``cls`` (at dotted ``key``): the nearest field and,
    for a TrainingArguments name in a stage section, the mmart field it maps to."""
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    section = key or section_name(cls)
    msg = f"unknown key {_join(key, str(name))!r}"
    ours = cls.trainer_names().get(str(name)) if isinstance(cls, type) and issubclass(cls, StageConfig) else None
    close = difflib.get_close_matches(str(name), known, n=1)
    if ours in known:
        msg += f"; {name!r} is the TrainingArguments name, mmart's is {_join(key, ours)!r}"
    elif close:
        msg += f"; did you mean {_join(key, close[0])!r}?"
    elif "extra" in known:
        msg += f"; a TrainingArguments/TRL field mmart does not set goes under {_join(key, 'extra')}.{name}"
    return msg + f" (`mmart config --fields{' ' + section if section else ''}` lists every key)"


def _from_dict(cls: type[T], data: dict, source: str, key: str, base_dir: Path | None) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            raise ConfigError(_at(source) + unknown_key(cls, key, k))
    kwargs = {k: _coerce(v, hints[k], source, _join(key, k), base_dir) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{_at(source)}{_join(key, e.field)} must be {e.allowed}, got {e.value!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_at(source)}{key + ': ' if key else ''}{e}") from None


INHERIT_KEY = "inherit"


def _read_mapping(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping, with ``inherit: other.yaml`` resolved: this file's keys deep-merged over the other's."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror if isinstance(e, OSError) else e}") from None
    data = load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (key: value lines) at the top level")
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    base_path = find_config(str(parent), Path(path).parent, what=f"{path}: inherit")
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: 'inherit' loops back to {base_path}")
    return _merge(_read_mapping(base_path, (*seen, Path(path).resolve())), data, base_path.parent)


def _merge(base: dict, over: dict, base_dir: Path) -> dict:
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        if isinstance(v, dict) and isinstance(b, str) and b.endswith((".yaml", ".yml")):
            b = _read_mapping(find_config(b, base_dir))  # an included section, refined key by key
        out[k] = _merge(b, v, base_dir) if isinstance(v, dict) and isinstance(b, dict) else v
    return out


def from_dict(cls: type[T], data: dict, source: str = "") -> T:
    """Build ``cls`` from a plain dict (e.g. a saved pipeline.yaml), with the same checks as a file."""
    return _from_dict(cls, data, source, "", None)


def _override_target(obj: Any, item: str, data: dict) -> tuple[dict, str]:
    """The mapping inside ``data`` (``to_dict(obj)``) that ``a.b.c=value`` sets, and the last key.

    Walks the dataclass types beside the data, so a misspelt key is named with the nearest field,
    while a ``dict`` field (``sft.extra``) takes any key.
    """
    key, _ = item.split("=", 1)
    parts = key.strip().split(".")
    node, cls, path = data, type(obj), ""
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if cls is not None:  # inside a dataclass section: only its fields
            fields = {f.name for f in dataclasses.fields(cls) if f.init}
            if p not in fields:
                raise ConfigError(f"--set {item!r}: " + unknown_key(cls, path, p))
            if last:
                return node, p
            tp = typing.get_type_hints(cls)[p]
            if dataclasses.is_dataclass(tp):
                cls = tp
            elif get_origin(tp) is dict:
                cls = None  # a free mapping (extra): any key below
            else:
                raise ConfigError(f"--set {item!r}: {_join(path, p)!r} is a value, not a section")
        elif last:
            return node, p
        node = node.setdefault(p, {}) if cls is None else node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {_join(path, p)!r} is not a mapping")
        path = _join(path, p)
    raise AssertionError("unreachable")


def apply_overrides(obj: T, overrides: list[str]) -> T:
    """Return a copy of ``obj`` with ``a.b.c=value`` overrides applied (value parsed as YAML)."""
    data = to_dict(obj)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. num_titles=50")
        node, last = _override_target(obj, item, data)
        node[last] = load_yaml(item.split("=", 1)[1], f"--set {item!r}")
    return _from_dict(type(obj), data, "--set", "", None)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (defaults when ``path`` is None), then apply overrides.

    ``path`` is found from any working directory (``find_config``). Keys a class lists in
    ``REQUIRED_IN_FILE`` must be in the file (or its ``inherit`` parent, or an override): a
    pipeline config that forgot ``data_dir`` would otherwise train on the demo world.
    """
    overrides = overrides or []
    if path is None:
        obj = cls()
    else:
        found = find_config(path)
        data = _read_mapping(found)
        given = {o.split("=", 1)[0].strip() for o in overrides}
        for key in getattr(cls, "REQUIRED_IN_FILE", ()):
            if key not in data and key not in given:
                raise ConfigError(f"{found}: {key} is missing; {getattr(cls, 'REQUIRED_HELP')}")
        obj = _from_dict(cls, data, str(path), "", found.parent)
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


@dataclasses.dataclass
class PipelineConfig:
    """What ``scripts/train.sh`` runs; a section may be given inline or as a path to a section YAML."""

    # A file must name these (itself or through `inherit`): defaults here would silently train on,
    # and write over, the demo world's folders.
    REQUIRED_IN_FILE: typing.ClassVar[tuple[str, ...]] = ("data_dir", "output_dir")
    REQUIRED_HELP: typing.ClassVar[str] = (
        "a pipeline config must name its dataset folder (data_dir, e.g. data/world) and its output folder "
        "(output_dir, e.g. outputs/NAME), or `inherit:` a config that does (docs/configs.md)")

    world: WorldConfig = dataclasses.field(default_factory=WorldConfig, metadata={
        "help": "The demo world `mmart world` generates into data_dir (configs/world/*.yaml)."})
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
    rationale: RationaleConfig = dataclasses.field(default_factory=RationaleConfig, metadata={
        "help": "`mmart rationales`: a teacher's justification of each SFT decision's target."})

    def __post_init__(self) -> None:
        if self.sft.reasoning == "before_answer" and (self.prompt.answer != "letter"
                                                      or self.prompt.candidate_context != "title"):
            raise ConfigError(
                f"sft.reasoning=before_answer needs prompt.answer: letter and prompt.candidate_context: title (got "
                f"{self.prompt.answer}, {self.prompt.candidate_context}): the rationale goes between the candidates "
                "and the one answer position that reads them all, and the per_candidate readout reads each "
                "candidate's score right after its artwork, where no text can come first; use sft.reasoning: "
                "auxiliary with that readout")

    @property
    def cache_dir(self) -> str:
        return self.cache.dir or f"{self.output_dir}/cache"

    @property
    def tower(self) -> VisionConfig:
        """``vision`` with ``{output_dir}`` in its checkpoint resolved: a tower adapted for a run lives in the run's
        folder (another dataset or output_dir never picks up a tower adapted for this one)."""
        ckpt = self.vision.checkpoint
        if not ckpt or "{output_dir}" not in ckpt:
            return self.vision
        return dataclasses.replace(self.vision, checkpoint=ckpt.replace("{output_dir}", self.output_dir))


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
