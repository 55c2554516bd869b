"""The ``llm`` teacher: a local causal LM writes each rationale, sharded over processes, resumable.

Decisions are cut into fixed shards of ``rationale.shard_size``; process ``r`` of ``n`` takes
shards ``r, r + n, ...``. A shard's rationales depend on its decisions only (its batches are the
same whichever process runs it), so the merged table equals one process's. Each shard is
written to a temporary file and renamed into place, then its record beside it: a process killed
at any point leaves whole shards, and a rerun keeps every shard whose record matches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mmart.errors import UserError
from mmart.examples import ExampleBuilder
from mmart.rationale.prompt import decision_fields
from mmart.rationale.targets import Target


def load_teacher_llm(folder: str, dtype: str, device):
    """The model and its tokenizer (left padding) from a local folder; no download, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder or not Path(folder).is_dir():
        raise UserError(f"rationale.model {folder!r} is not a local model folder; the llm teacher loads a folder "
                        "holding config.json, weights and a tokenizer (set --set rationale.model=PATH)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"rationale.model {folder}: its tokenizer has no chat template; use an instruct/chat model")
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                 dtype=getattr(torch, dtype))
    return model.to(device).eval(), tokenizer


def chat_prompt(tokenizer, template: str, fields: dict[str, str]) -> str:
    messages = [{"role": "user", "content": template.format(**fields)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
             batch_size: int = 8) -> list[str]:
    """Each prompt's continuation (special tokens dropped, stripped): left-padded batches, KV cache, greedy at 0."""
    import torch

    out: list[str] = []
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, **sampling)
        new = ids[:, enc["input_ids"].shape[1]:]
        out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def shard_slices(n: int, shard_size: int) -> list[range]:
    return [range(i, min(i + shard_size, n)) for i in range(0, n, shard_size)]


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.parquet"


def shard_record(made: dict, index: int, targets: Sequence[Target]) -> dict:
    """The stage's record plus the shard's index and decisions (ids and targets)."""
    h = hashlib.sha256("\n".join(f"{t.example.example_id}|{t.index}" for t in targets).encode()).hexdigest()[:16]
    return {**made, "shard": {"index": index, "decisions": h}}


def write_table(rows: list[dict], path: Path) -> None:
    """``rows`` as a Parquet file, written to a temporary name and renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def run_shards(targets: Sequence[Target], builder: ExampleBuilder, rcfg, made: dict, folder: Path, rank: int,
               world: int, device, rows_of: Callable[[Sequence[Target], list[str]], list[dict]],
               on_shard: Callable[[int], None] | None = None, main: bool = True) -> tuple[int, int]:
    """Write this process's unfinished shards; returns (shards written, shards kept)."""
    from tqdm.auto import tqdm

    from mmart.artefacts import stale, stale_tmp, write_record

    if main:  # a write cut off by a kill leaves its temporary file: never a complete shard
        for tmp in folder.glob(".shard-*.tmp-*"):
            if stale_tmp(tmp):
                tmp.unlink(missing_ok=True)
    slices = shard_slices(len(targets), rcfg.shard_size)
    mine = [i for i in range(len(slices)) if i % world == rank]
    todo = [i for i in mine if stale(shard_path(folder, i), shard_record(made, i, [targets[j] for j in slices[i]]))]
    if not todo:
        return 0, len(mine)
    model, tokenizer = load_teacher_llm(rcfg.model, rcfg.dtype, device)
    bar = tqdm(total=sum(len(slices[i]) for i in todo), desc="rationales", unit="decision", disable=not main)
    for i in todo:
        part = [targets[j] for j in slices[i]]
        if rcfg.temperature > 0:
            import torch

            torch.manual_seed(rcfg.seed + i)  # per shard: the same draws whichever process runs it
        prompts = [chat_prompt(tokenizer, rcfg.template, decision_fields(builder, t.example, t.index)) for t in part]
        texts = generate(model, tokenizer, prompts, rcfg.max_new_tokens, rcfg.temperature, rcfg.batch_size)
        path = shard_path(folder, i)
        write_table(rows_of(part, texts), path)
        write_record(path, shard_record(made, i, part))
        bar.update(len(part))
        if on_shard is not None:
            on_shard(i)
    bar.close()
    return len(todo), len(mine) - len(todo)
