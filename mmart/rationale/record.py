"""What a rationales table is made from (``made_from.json``, as every artefact: ``mmart.artefacts``).

A table is reused only when its record equals what the stage would make now: the same decisions
(the dataset, SFT's sampling and teacher settings, the prompt settings that order and render
candidates), the same teacher (``taste`` with its verbaliser version, or ``llm`` with the model's
fingerprint, the prompt template and the decoding settings). Each ``llm`` shard carries the same
record plus its index and decisions, so a rerun keeps exactly the shards these inputs made.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mmart.artefacts import RATIONALES, _section, data_fingerprint

STAGE, TABLE = RATIONALES
# Bump when the taste verbaliser's wording or evidence changes: its tables are then written again.
TASTE_VERSION = 1
_SMALL = 64 << 20  # model files up to this size are hashed whole; larger (weights) by size, head and tail


def rationale_table(cfg: Any, out: str | Path | None = None) -> Path:
    """Where the rationales table of ``cfg`` lives: ``<out>/rationales.parquet``, by default under
    ``<output_dir>/rationales`` (where SFT with ``sft.reasoning: auxiliary`` reads it)."""
    return Path(out or Path(cfg.output_dir) / STAGE) / TABLE


def model_folder_fingerprint(folder: str | Path) -> str:
    """A local model folder's config, tokenizer and template files, hashed whole, and its weight files by name,
    size and their first and last MiB (an 8B model's 16 GB would take a minute to read in full)."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(folder)).encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if size <= _SMALL:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:16]


def rationale_made_from(cfg: Any, teacher: str) -> dict:
    """The record of ``mmart rationales`` with ``teacher`` (``taste`` or ``llm``) on ``cfg``."""
    from mmart.train.common import examples_budget

    s, r = cfg.sft, cfg.rationale
    decisions = {"examples": s.examples, "max_examples": examples_budget(s), "unlogged_titles": s.unlogged_titles,
                 "seed": s.seed, "teacher": s.teacher}
    config: dict[str, Any] = {"teacher": teacher, "sft": decisions, "prompt": _section(cfg, "prompt")}
    inputs: dict[str, Any] = {"data": data_fingerprint(cfg.data_dir)}
    record: dict[str, Any] = {"stage": STAGE, "config": config, "inputs": inputs}
    if teacher == "taste":
        config["taste"] = {"version": TASTE_VERSION, "evidence": r.evidence}
    else:
        config["llm"] = {"model": Path(r.model).name, "template": r.template, "max_new_tokens": r.max_new_tokens,
                         "temperature": r.temperature, "seed": r.seed if r.temperature > 0 else None,
                         "batch_size": r.batch_size, "shard_size": r.shard_size, "dtype": r.dtype}
        inputs["model"] = model_folder_fingerprint(r.model) if Path(r.model).is_dir() else None
        record["model_dir"] = str(r.model)  # where it was (not compared: a moved folder stays fresh)
    return record
