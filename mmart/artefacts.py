"""What each artefact was made from, and whether today's config and inputs would make the same.

Every stage output (``init/model``, ``sft/model``, ``sft/merged``, ``dpo/model``, a stage's
``checkpoints/``, ``preds/<name>.parquet``, ``eval/``) carries a record, ``made_from.json``:
the stage, the config sections that shape it, and fingerprints of its inputs (dataset
tables, embedding cache, the model it started from). A stage's output is reused only when
its record equals what the stage would be made from now; otherwise it reruns
(``scripts/train.sh`` asks ``mmart status``) and its checkpoints from other inputs are
discarded, never resumed. A later stage's record holds the fingerprint of the earlier
stage's output, so a change anywhere reruns that stage and every one after it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORD = "made_from.json"
RATIONALES = ("rationales", "rationales.parquet")  # <output_dir>/rationales/<table>: written by `mmart rationales`, read by SFT
TABLES = ("titles", "artworks", "users", "impressions")
STAGES = ("init", "sft", "dpo", "predict", "eval")
# Settings that change how a stage reports or checkpoints, not what it makes.
# reasoning_max_tokens shapes what the trained model generates, not the SFT model: DPO and predict record it.
NOT_SHAPING = {"logging_steps", "save_steps", "report_to", "eval_steps", "reasoning_max_tokens"}
# Keys of a record that say where an input was, not what it was: never compared (a moved run stays fresh).
WHERE = ("model_dir",)
# Keys about the artefact itself, checked apart from what it was made from: ``output``, a saved model's own
# fingerprint (``stale`` checks it), and ``launch``, the process count it trained on (only a resume compares it:
# ``launch_change``).
OWN = ("output", "launch")
# The record format, written into every record. Bump it when a shaping config field is added, and list the field
# under the new format with the value that does what every stage did before it existed: a record of an older
# format lacks the field and still matches while the config keeps that value, so upgrading mmart does not retrain
# what the new field would not change. A record of the current format that lacks a field differs for real.
RECORD_FORMAT = 3
FIELDS_ADDED: dict[int, dict[str, Any]] = {
    2: {"prompt.history_genres": 0, "dpo.negatives": "all", "prompt.candidate_context": "title",
        "prompt.history_summary_margins": "numbers"},
    3: {"sft.reasoning": "none", "sft.reasoning_weight": 0.5},
}
# Keys about the record itself: never compared.
META = ("format",)


def sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def data_fingerprint(data_dir: str | Path) -> str:
    """The dataset's tables (images are covered by the cache's own per-image hashes)."""
    root = Path(data_dir)
    return sha256_files(root / f"{t}.parquet" for t in TABLES if (root / f"{t}.parquet").is_file())[:16]


def images_fingerprint(data_dir: str | Path) -> str:
    """The artworks table and every image file's bytes (what a tower adapted on the catalog saw)."""
    import pyarrow.parquet as pq

    root = Path(data_dir)
    h = hashlib.sha256(sha256_files([root / "artworks.parquet"]).encode())
    for rel in sorted(pq.read_table(root / "artworks.parquet", columns=["path"]).column("path").to_pylist()):
        path = root / str(rel)
        h.update(str(rel).encode())
        h.update(sha256_files([path]).encode() if path.is_file() else b"missing")
    return h.hexdigest()[:16]


def cache_fingerprint(cache_dir: str | Path) -> str | None:
    """The cache's manifest (tower fingerprint, shard checksums, artwork ids and image hashes)."""
    manifest = Path(cache_dir) / "manifest.json"
    return sha256_files([manifest])[:16] if manifest.is_file() else None


def tower_fingerprint(cache_dir: str | Path) -> str | None:
    """The tower and preprocessing the cache was encoded with (not its rows: adding artworks keeps it)."""
    manifest = Path(cache_dir) / "manifest.json"
    try:
        fingerprint = json.loads(manifest.read_text())["fingerprint"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str | None:
    """A saved chooser's weights and spec (None when it is not a complete chooser folder)."""
    folder = Path(model_dir)
    if not (folder / "mmart_chooser.json").is_file():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name == "mmart_chooser.json")
    return sha256_files(files)[:16]


def _section(cfg: Any, name: str) -> Any:
    from mmart.config import to_dict

    value = to_dict(getattr(cfg, name))
    return {k: v for k, v in value.items() if k not in NOT_SHAPING} if isinstance(value, dict) else value


def made_from(cfg: Any, stage: str, model_dir: str | Path | None = None, preds: dict[str, str] | None = None) -> dict:
    """What ``stage`` of ``cfg`` is made from now: config sections and input fingerprints.

    ``model_dir``: for ``dpo``, the SFT model it starts from (default ``<output_dir>/sft/model``); for
    ``predict``, the model scored. ``preds``: for ``eval``, name -> predictions file.
    """
    from mmart.train.common import examples_budget, use_bf16

    out = Path(cfg.output_dir)
    embeddings = cfg.prompt.artwork_input == "embeddings"
    if stage == "predict":
        e = cfg.eval
        return predict_made_from(model_dir, cfg.data_dir, cfg.cache_dir if embeddings else None, e.split, e.max_pairs,
                                 e.pairs, e.seed, use_bf16(e.bf16), e.candidate_orders,
                                 explain=cfg.sft.reasoning == "before_answer",
                                 reasoning_max_tokens=cfg.sft.reasoning_max_tokens)
    if stage == "eval":
        return eval_made_from(cfg.data_dir, preds or {}, cfg.eval.n_boot, cfg.eval.seed)
    if stage not in ("init", "sft", "dpo"):
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    inputs: dict[str, Any] = {"data": data_fingerprint(cfg.data_dir)}
    if embeddings:
        inputs["cache"] = cache_fingerprint(cfg.cache_dir)
        inputs["tower"] = tower_fingerprint(cfg.cache_dir)  # what scoring checks: any cache of the same tower
    config = {name: _section(cfg, name) for name in ("model", "prompt", "cache")}
    if stage in ("sft", "dpo"):  # the budget this CPU kind trains on; SFT's shapes DPO's too (DPO takes other members)
        config["examples"] = {"sft": examples_budget(cfg.sft)}
        if stage == "dpo":
            config["examples"]["dpo"] = examples_budget(cfg.dpo)
    if stage == "sft":
        config["sft"] = _section(cfg, "sft")
        if embeddings and cfg.model.projector_init != "random":
            inputs["init"] = model_fingerprint(out / "init" / "model")  # SFT starts from init's projector
        if cfg.sft.reasoning != "none":  # it trains on the rationales too: another table, another model
            table = out.joinpath(*RATIONALES)
            inputs["rationales"] = sha256_files([table])[:16] if table.is_file() else None
    if stage == "dpo":
        config["dpo"] = _section(cfg, "dpo")
        if cfg.sft.reasoning == "before_answer":  # its rows read the SFT model's own rationales, this long at most
            config["reasoning_max_tokens"] = cfg.sft.reasoning_max_tokens
        inputs["sft"] = model_fingerprint(model_dir or out / "sft" / "model")
    return {"stage": stage, "config": config, "inputs": inputs}


def eval_made_from(data_dir: str | Path, preds: dict[str, str | Path], n_boot: int, seed: int,
                   fuse_val: dict[str, str | Path] | None = None) -> dict:
    """What a report is made from: the dataset, each predictions file (and each --fuse-val file, when any),
    the bootstrap settings."""
    digest = lambda files: {k: sha256_files([Path(v)])[:16] if Path(v).is_file() else None  # noqa: E731
                            for k, v in sorted(files.items())}
    inputs = {"data": data_fingerprint(data_dir), "predictions": digest(preds)}
    if fuse_val:
        inputs["fuse_val"] = digest(fuse_val)
    return {"stage": "eval", "config": {"n_boot": n_boot, "seed": seed}, "inputs": inputs}


def predict_made_from(model_dir: str | Path | None, data_dir: str | Path, cache_dir: str | Path | None, split: str,
                      max_pairs: int, slice_: str, seed: int, bf16: bool, candidate_orders: int = 1,
                      explain: bool = False, reasoning_max_tokens: int | None = None) -> dict:
    """What a predictions file is made from: the model, the data and cache, which pairs, and the precision.

    ``candidate_orders`` (above 1) and ``explain`` (the model wrote rationales) are recorded only when set, so
    records written before they existed still match."""
    inputs = {"model": model_fingerprint(model_dir) if model_dir else None, "data": data_fingerprint(data_dir)}
    if cache_dir is not None:
        inputs["cache"] = cache_fingerprint(cache_dir)
    config = {"split": split, "max_pairs": max_pairs, "slice": slice_, "seed": seed, "bf16": bool(bf16)}
    if candidate_orders != 1:
        config["candidate_orders"] = candidate_orders
    if explain:  # the model wrote rationales, at most this long
        config["explain"] = True
        config["reasoning_max_tokens"] = reasoning_max_tokens
    return {"stage": "predict", "inputs": inputs, "config": config}


def record_path(artefact: str | Path) -> Path:
    """Where an artefact's record lives: inside a folder, beside a file (``preds.parquet`` -> ``preds.made_from.json``)."""
    p = Path(artefact)
    return p / RECORD if p.suffix == "" else p.with_name(f"{p.stem}.{RECORD}")


def write_record(artefact: str | Path, record: dict) -> Path:
    """Atomically write ``record`` for ``artefact`` (after the artefact itself is complete)."""
    path = record_path(artefact)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**record, "format": RECORD_FORMAT}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_record(artefact: str | Path) -> dict | None:
    try:
        return json.loads(record_path(artefact).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fields_added_since(record_format: int) -> dict[str, Any]:
    """Config fields a record of ``record_format`` predates, each with the value that keeps its old behaviour."""
    return {k: v for fmt, added in sorted(FIELDS_ADDED.items()) if fmt > record_format for k, v in added.items()}


def differences(recorded: dict | None, wanted: dict, limit: int = 3) -> list[str]:
    """Human-readable differences between a record and what is wanted now (empty: the same)."""
    if recorded is None:
        return ["no record of what it was made from"]
    added_since = fields_added_since(recorded.get("format", 1))
    recorded = {k: v for k, v in recorded.items() if k not in WHERE + OWN + META}
    wanted = {k: v for k, v in wanted.items() if k not in WHERE + OWN + META}
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        elif a != b and not (a is None and where.startswith("config.")
                             and added_since.get(where.split(".", 1)[1], a) == b):
            what = "changed" if where.startswith("inputs") else f"{_short(a)} -> {_short(b)}"
            out.append(f"{where}: {what}")

    walk(recorded, wanted, "")
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def stale(artefact: str | Path, wanted: dict) -> list[str]:
    """Why ``artefact`` cannot be reused for ``wanted`` (empty list: reuse it).

    A model whose record holds its own fingerprint (``write_model_record``) is also stale when
    its weight files are no longer the ones recorded (rewritten by another run, a copy, an edit).
    """
    if not Path(artefact).exists():
        return ["missing"]
    record = read_record(artefact)
    why = differences(record, wanted)
    if not why and record and record.get("output") and model_fingerprint(artefact) != record["output"]:
        why = [f"its weight files changed after its {RECORD} was written (output fingerprint differs)"]
    return why


def write_model_record(model_dir: str | Path, wanted: dict, launch: dict | None = None) -> Path:
    """``write_record`` for a saved model, adding its own fingerprint (``stale`` checks it) and its ``launch``."""
    record = {**wanted, "output": model_fingerprint(model_dir)}
    return write_record(model_dir, {**record, "launch": launch} if launch else record)


def launch_change(checkpoints: Path, wanted: dict, launch: dict) -> str | None:
    """How ``launch`` differs from the one ``checkpoints`` of these inputs were trained under, or None.

    Resuming them under another process count trains another schedule (the per-process batch
    and the step count follow it): a 2-process run's last checkpoint resumed in 1 process went
    on from step 10 to 19. None when nothing would be resumed (other inputs: discarded) or the
    record predates the launch being recorded.
    """
    record = read_record(checkpoints)
    if not record or differences(record, wanted) or not any(checkpoints.glob("checkpoint-*")):
        return None
    was = record.get("launch")
    if not isinstance(was, dict) or was == launch:
        return None
    return ", ".join(f"{k} {was.get(k)} (checkpoints) vs {launch.get(k)} (now)"
                     for k in sorted(set(was) | set(launch)) if was.get(k) != launch.get(k))


def fresh_checkpoints(checkpoints: Path, wanted: dict, say=print, launch: dict | None = None) -> None:
    """Keep ``checkpoints/`` only if it was made from ``wanted``; else discard it (never resume other inputs).

    ``launch`` (e.g. ``{"processes": 2}``) is recorded beside, for ``launch_change``.
    """
    import shutil

    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        why = stale(checkpoints, wanted)
        if why:
            say(f"[mmart] discarding {checkpoints} (made from other inputs: {'; '.join(why)}); starting over")
            shutil.rmtree(checkpoints)
    write_record(checkpoints, {**wanted, "launch": launch} if launch else wanted)


def stale_tmp(path: Path) -> bool:
    """A ``*.tmp-PID`` file whose writer is gone (a killed build); a live concurrent build's file is left alone."""
    try:
        pid = int(path.name.rsplit(".tmp-", 1)[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
