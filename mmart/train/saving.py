"""Saving the trained chooser under every launch mode: gathered on every rank, written once, atomically.

Under DDP and DeepSpeed ZeRO-2 every rank holds every weight. Under FSDP2 each parameter is
a DTensor with 1/N of its rows on each rank; under ZeRO-3 each is an empty placeholder whose
shard sits elsewhere (``ds_tensor``). Rank 0's local tensors are then slices (FSDP: the
safetensors writer fails on their storage) or shape ``(0,)`` (ZeRO-3: an empty adapter that
saves without error). So the weights a chooser folder needs (adapter, projector copies) are
first gathered in full, by every rank together (the gathers are collectives), with the
libraries' own means: ``DTensor.full_tensor`` for FSDP2, ``deepspeed.zero.GatheredParameters``
for ZeRO-3. Only those are gathered, never the frozen base LLM (16 GB for an 8B model).

The main process then writes the folder under a temporary name and renames it into place,
so a crash never leaves a half-written ``model/`` that a rerun (or ``scripts/train.sh``'s
"stage done" check on ``mmart_chooser.json``) would take for a finished one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from mmart.distributed import sharding_summary
from mmart.model.checkpoint import save_chooser
from mmart.model.chooser import PROJECTOR_ATTR


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # DeepSpeed marks the parameters it partitions


def gathered_weights(model: nn.Module, keep: Callable[[str, torch.Tensor], bool]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the parameters ``keep(name, param)`` selects, by ``named_parameters`` name.

    A collective under FSDP2 and ZeRO-3: every rank must call it with the same model and
    selection; every rank gets the full tensors.
    """
    named = [(n, p) for n, p in model.named_parameters() if keep(n, p)]
    if any(_is_zero3(p) for _, p in named):
        import deepspeed

        # modifier_rank=None: read-only; every rank sees the full tensors inside the block.
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            out = {n: p.detach().to("cpu", copy=True) for n, p in named}
    else:
        from torch.distributed.tensor import DTensor

        out = {}
        for n, p in named:
            t = p.detach()
            out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).to("cpu", copy=True)
    for n, p in named:  # a shard or an empty placeholder must never pass for the weight
        full = int(getattr(p, "ds_numel", p.numel()))
        if out[n].numel() != full:
            raise RuntimeError(f"gathered {n} has {out[n].numel()} elements, the parameter {full}")
    return out


def chooser_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a chooser folder holds, in full: the active adapter's weights and both projector copies
    (trainable or not: ``projector_lr: 0`` freezes the adapter's copy, which is still saved)."""
    adapter = getattr(model, "active_adapter", None)
    marker = f".{adapter}." if isinstance(adapter, str) else None

    def keep(name: str, param: torch.Tensor) -> bool:
        return param.requires_grad or PROJECTOR_ATTR in name or (marker is not None and marker in name)

    return gathered_weights(model, keep)


def write_atomically(folder: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary sibling folder, which then replaces ``folder`` (renames, same filesystem)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared run folder unreadable to others
        write(tmp)
        if folder.exists():
            old = tmp.with_name(tmp.name + "-old")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def say_layout(accelerator, model_dir: Path, layout: str) -> None:
    """One line from the main process on how the ranks hold the model being saved (``sharding_summary``):
    ``... (all 2 ranks)`` when they agree, else one line per rank. A collective: call on every rank."""
    from accelerate.utils import gather_object

    from mmart.log import say

    layouts = gather_object([layout]) if accelerator.num_processes > 1 else [layout]
    if len(set(layouts)) == 1:
        say(f"[mmart] saving {model_dir} from {layout} "
            f"({'all ' + str(len(layouts)) + ' ranks' if len(layouts) > 1 else '1 process'})")
    else:
        for rank, line in enumerate(layouts):
            say(f"[mmart] saving {model_dir} from {line} (rank {rank})")


def save_trained_chooser(trainer, tokenizer, model_dir: str | Path, base_model: str | None = None,
                         files: Mapping[str, str] | None = None, stacked_on: str | Path | None = None) -> Path:
    """Save ``trainer``'s chooser into ``model_dir``: call on every rank (the gathers are collective).

    ``base_model``: recorded instead of the model's own; ``stacked_on``: the chooser folder whose
    merged model the trainer's adapter was trained on (DPO on SFT): the two adapters are stacked
    into one on that folder's base (``mmart.model.checkpoint.stack_adapter``), so the saved folder
    stands alone; ``files``: extra text files (name -> content) written into the folder before it
    appears. Returns once the folder is in place, on every rank.
    """
    from mmart.model.checkpoint import stack_adapter

    model_dir = Path(model_dir)
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    say_layout(accelerator, model_dir, sharding_summary(accelerator, model, trainer.model_wrapped))
    weights = chooser_weights(model)
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            save_chooser(model, tokenizer, tmp, base_model=base_model, weights=weights)
            if stacked_on is not None:
                stack_adapter(stacked_on, tmp)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)

        write_atomically(model_dir, write)
    accelerator.wait_for_everyone()
    return model_dir


def training_facts(trainer, decisions: int, rows: int, seconds: float | None = None) -> dict:
    """What a model card says about a finished training run: its size and the last logged metrics
    (training, and val when it was evaluated), from the trainer's log history."""
    skip = {"epoch", "step", "learning_rate", "grad_norm", "decisions"}
    history = trainer.state.log_history
    train = next((h for h in reversed(history) if "loss" in h), {})
    val = next((h for h in reversed(history) if any(k.startswith("eval_") for k in h)), {})
    facts: dict = {"decisions": decisions, "rows": rows, "steps": trainer.state.global_step,
                   "epochs": round(float(trainer.state.epoch or 0), 2)}
    if seconds is not None:
        facts["seconds"] = seconds
    facts["train"] = {k: v for k, v in train.items() if k not in skip and isinstance(v, (int, float))}
    facts["val"] = {k[len("eval_"):]: v for k, v in val.items() if k.startswith("eval_") and isinstance(v, (int, float))
                    and not k.endswith(("_runtime", "_per_second")) and k != "eval_decisions"}
    return facts
