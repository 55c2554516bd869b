"""``mmart config``: print a resolved pipeline config, one section, one value, or every field with its help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import types
import typing
from typing import Any, Union, get_args, get_origin


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print a resolved config, a section, one value, or every field with its help (--fields)",
        description=(
            "Resolve a pipeline config (configs/default.yaml, configs/smoke.yaml, ...) with its included "
            "section files and --set overrides, and print it as YAML. --section NAME prints one section "
            "(e.g. the world preset to pass to `mmart world`); --get KEY prints one value (for shell scripts); "
            "--fields [SECTION] lists every field (or one section's, e.g. sft) with its type, default, help and, "
            "for sft and dpo, the TrainingArguments name it is passed as (with a config: its value there). "
            "A config name is looked up in the working directory, then in the project's configs/ folder."
        ),
        epilog="Examples: mmart config configs/smoke.yaml --get output_dir | mmart config --fields sft | "
               "mmart config configs/default.yaml --fields model",
    )
    p.add_argument("config", nargs="?", help="pipeline config YAML (optional with --fields)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. world.seed=3")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--section", help="print only this section (YAML)")
    g.add_argument("--get", metavar="KEY", help="print one dotted value, e.g. data_dir")
    g.add_argument("--fields", nargs="?", const="", metavar="SECTION",
                   help="list every field (or one section's: world, vision, vision.adapt, cache, prompt, model, "
                        "sft, dpo, eval, rationale) with type, default and help")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import yaml

    from mmart.config import PipelineConfig, load_config, to_dict
    from mmart.errors import UserError

    if args.fields is not None:
        cfg = load_config(PipelineConfig, args.config, args.set) if args.config else None
        print(describe_fields(args.fields, cfg))
        return 0
    if not args.config:
        raise UserError("name a pipeline config, e.g. `mmart config configs/default.yaml` (or use --fields)")
    cfg = load_config(PipelineConfig, args.config, args.set)
    data = to_dict(cfg)
    if args.get is not None:  # derived values a script may ask for (never in the dump, which must load again)
        data = {**data, "cache_dir": cfg.cache_dir, "vision_checkpoint": cfg.tower.checkpoint}
    key = args.section or args.get
    if key:
        for part in key.split("."):
            if not isinstance(data, dict) or part not in data:
                raise UserError(f"{args.config}: no key {key!r}")
            data = data[part]
    if args.get is not None and not isinstance(data, (dict, list)):
        print(data)
    elif args.get is not None:
        print(json.dumps(data))
    else:
        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0


def type_label(tp: Any) -> str:
    """An annotation as a user writes the value: ``float or null``, ``one of: linear, mlp2x_gelu``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        rest = [type_label(a) for a in args if a is not type(None)]
        return " or ".join(rest) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_label(get_args(tp)[0])}" if get_args(tp) else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, str, bool, type(None))) else repr(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe_fields(section: str = "", cfg: Any = None) -> str:
    """Every field of the pipeline config (or of one dotted ``section``): type, default, help, and
    for the SFT/DPO stages the trainer's name for it; with ``cfg``, its value where it differs."""
    from mmart.config import PipelineConfig
    from mmart.errors import UserError

    cls: type = PipelineConfig
    value = cfg
    key = ""
    for part in [p for p in section.split(".") if p]:
        hints = typing.get_type_hints(cls)
        sections = [n for n, t in hints.items() if dataclasses.is_dataclass(t)]
        if part not in sections:
            import difflib

            close = difflib.get_close_matches(part, sections, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"--fields {section!r}: no section {part!r} in {key or 'the pipeline config'}{hint} "
                            f"Sections: {', '.join(sections)}")
        cls, key = hints[part], f"{key}.{part}" if key else part
        value = getattr(value, part) if value is not None else None
    lines: list[str] = []
    _describe(cls, key, value, lines)
    return "\n".join(lines)


def _title(cls: type, key: str) -> str:
    """A section's one-line title: the pipeline field's help, else the class docstring's first line."""
    from mmart.config import PipelineConfig

    parent, _, name = key.rpartition(".")
    owner: type = PipelineConfig
    for part in [p for p in parent.split(".") if p]:
        owner = typing.get_type_hints(owner)[part]
    help_ = next((f.metadata.get("help") for f in dataclasses.fields(owner) if f.name == name), None) if key else None
    doc = cls.__doc__ or ""
    if not help_ and doc and not doc.startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
        help_ = doc.strip().splitlines()[0].replace("``", "`")
    return f"[{key or 'pipeline'}] {cls.__name__}" + (f": {help_}" if help_ else "")


def _describe(cls: type, key: str, value: Any, lines: list[str]) -> None:
    from mmart.train.config import DPO_TRAINER_NAMES, trainer_name

    hints = typing.get_type_hints(cls)
    stage = any(f.name == "extra" for f in dataclasses.fields(cls))  # sft, dpo: passed to a trainer
    lines.append(_title(cls, key))
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(tp):
            nested.append((tp, name, getattr(value, f.name) if value is not None else None))
            continue
        default = _default(f)
        line = f"  {name}: {type_label(tp)} = {_value(default)}"
        if value is not None and getattr(value, f.name) != default:
            line += f"  (this config: {_value(getattr(value, f.name))})"
        theirs = trainer_name(f.name) if stage else None
        if theirs:
            owner = "DPOConfig" if theirs in DPO_TRAINER_NAMES else "TrainingArguments"
            line += f"  [{owner}: {theirs}]"
        lines.append(line)
        help_ = f.metadata.get("help")
        if help_:
            lines.extend(textwrap.wrap(help_, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    if stage:
        trainer = "trl.SFTConfig" if key.endswith("sft") else "TrainingArguments / trl.DPOConfig"
        lines.append(textwrap.fill(
            f"[TrainingArguments: x] is the trainer's name for a field. {key}.extra takes any other {trainer} "
            f"field mmart does not set itself (e.g. --set {key}.extra.max_grad_norm=1.0); one mmart sets is "
            f"refused, naming the {key} key to use.", width=100, initial_indent="  ", subsequent_indent="  "))
    for tp, name, v in nested:
        lines.append("")
        _describe(tp, name, v, lines)
