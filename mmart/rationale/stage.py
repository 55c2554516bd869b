"""``mmart rationales``: one rationale per SFT decision, as a Parquet table with its record.

Writes ``<out>/rationales.parquet`` (default ``<output_dir>/rationales``), one row per decision:
its key (example_id, user_id, title_id, split, timestamp), its candidates in letter order, the
target (index, letter, artwork id, where it came from), the teacher and the rationale, and beside
it ``rationales.made_from.json`` (``mmart.rationale.record``). A table whose record matches is
reused; any other is written again. The ``llm`` teacher's shards live in ``<out>/shards/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from mmart.errors import UserError
from mmart.log import say
from mmart.model.readout import LETTERS
from mmart.rationale.record import rationale_made_from, rationale_table
from mmart.rationale.targets import Target, sft_targets


def table_rows(targets: Sequence[Target], texts: Sequence[str], teacher: str) -> list[dict]:
    return [{"example_id": t.example.example_id, "user_id": t.example.user_id, "title_id": t.example.title_id,
             "split": t.example.split, "timestamp": t.example.timestamp, "candidates": list(t.example.candidates),
             "target": t.index, "target_letter": LETTERS[t.index], "target_artwork_id": t.artwork_id,
             "target_source": t.source, "teacher": teacher, "rationale": text}
            for t, text in zip(targets, texts)]


def _sft_teacher(cfg, contract, teacher: str):
    """SFT's teacher (None for sft.teacher none), and the taste teacher the taste verbaliser explains."""
    from mmart.eval.teacher import fit_teacher

    if teacher == "taste" and cfg.sft.teacher == "reward_model":
        raise UserError("rationale.teacher taste explains the taste teacher's choices, but sft.teacher is reward_model "
                        "(SFT's targets are its choices): set sft.teacher to taste or none, or use --teacher llm")
    sft = fit_teacher(contract, cfg.sft.teacher, split="train") if cfg.sft.teacher != "none" else None
    taste = (sft or fit_teacher(contract, "taste", split="train")) if teacher == "taste" else None
    return sft, taste


def run_rationales(cfg, teacher: str | None = None, out: str | Path | None = None,
                   on_shard: Callable[[int], None] | None = None) -> Path:
    """Write (or reuse) the rationales table of ``cfg``'s SFT decisions; returns its path.

    ``teacher`` overrides ``rationale.teacher``; ``on_shard(index)`` is called after each ``llm`` shard this
    process writes (tests interrupt a run there)."""
    from mmart.artefacts import stale, write_record
    from mmart.data.contract import load_contract
    from mmart.distributed import distributed_state
    from mmart.examples import ExampleBuilder

    if teacher is not None and teacher != cfg.rationale.teacher:
        cfg = dataclasses.replace(cfg, rationale=dataclasses.replace(cfg.rationale, teacher=teacher))
    teacher = cfg.rationale.teacher
    table = rationale_table(cfg, out)
    folder = table.parent
    state = distributed_state()
    made = rationale_made_from(cfg, teacher)
    why = stale(table, made)
    if not why:
        say(f"[mmart rationales] {table} is up to date (its record matches); kept")
        return table
    if table.exists():
        say(f"[mmart rationales] {table} was made from other inputs ({'; '.join(why)}); writing it again")
    contract = load_contract(cfg.data_dir)
    builder = ExampleBuilder(contract, cfg.prompt)
    sft_teacher, taste = _sft_teacher(cfg, contract, teacher)
    targets = sft_targets(cfg, builder, sft_teacher)
    if not targets:
        raise UserError("SFT trains on no decision of this config (no played decision was sampled and sft.teacher "
                        "is none): nothing to justify")
    if teacher == "taste":
        rows = None
        if state.is_main_process:  # seconds for every decision: one process writes
            from mmart.rationale.taste import TasteVerbaliser

            verbalise = TasteVerbaliser(taste, builder, cfg.rationale.evidence)
            rows = table_rows(targets, [verbalise(t.example, t.index) for t in targets], teacher)
    else:
        rows = _llm_rows(cfg, builder, targets, made, folder, state, on_shard)
    if state.is_main_process:
        from mmart.rationale.llm import write_table

        write_table(rows, table)
        write_record(table, made)
        say(f"[mmart rationales] {len(rows)} rationales ({teacher} teacher) -> {table}")
    state.wait_for_everyone()
    return table


def _llm_rows(cfg, builder, targets, made, folder, state, on_shard) -> list[dict] | None:
    """Every process writes its shards; the main process then merges them in shard order."""
    import pyarrow.parquet as pq

    from mmart.artefacts import stale
    from mmart.rationale.llm import run_shards, shard_path, shard_record, shard_slices

    shards = folder / "shards"

    def rows_of(part: Sequence[Target], texts: list[str]) -> list[dict]:
        return table_rows(part, texts, "llm")

    written, kept = run_shards(targets, builder, cfg.rationale, made, shards, state.process_index,
                               state.num_processes, state.device, rows_of, on_shard, state.is_main_process)
    n = len(shard_slices(len(targets), cfg.rationale.shard_size))
    say(f"[mmart rationales] {n} shard(s) of {cfg.rationale.shard_size} decisions over {state.num_processes} "
        f"process(es); this one wrote {written}, kept {kept} finished")
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows: list[dict] = []
    for i, part in enumerate(shard_slices(len(targets), cfg.rationale.shard_size)):
        path = shard_path(shards, i)
        why = stale(path, shard_record(made, i, [targets[j] for j in part]))
        if why:  # a process failed without raising here: never merge a shard of other inputs
            raise UserError(f"rationale shard {path} is not finished ({'; '.join(why)}); run the stage again")
        rows.extend(pq.read_table(path).to_pylist())
    return rows
