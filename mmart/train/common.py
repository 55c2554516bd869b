"""What SFT, DPO and scoring share: loading the stage inputs, trainer arguments, optimizer groups, curves."""

from __future__ import annotations

import functools
import importlib.util
import os
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmart.config import PipelineConfig
from mmart.data.contract import Contract, load_contract
from mmart.distributed import trainer_accelerator_config
from mmart.examples import ExampleBuilder
from mmart.model.chooser import PROJECTOR_ATTR
from mmart.train.config import StageConfig, check_extra, trainer_settings


@dataclass
class StageInputs:
    contract: Contract
    builder: ExampleBuilder
    cache: Any  # ArtworkCache or None (caption prompts need none)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_inputs(cfg: PipelineConfig, data_dir: str | None = None, check: bool = True,
                expect_tower: bool = True) -> StageInputs:
    """The contract, the example builder, and (for artwork slots) the verified cache on the device.

    ``expect_tower``: refuse a cache built by another tower than ``vision`` names (training). Scoring
    a saved model passes False: its record names the cache it was trained with, and the tower file
    itself is not needed to read a cache.
    """
    contract = load_contract(data_dir or cfg.data_dir, check=check)
    cache = None
    if cfg.prompt.artwork_input == "embeddings":
        from mmart.vision.store import ArtworkCache

        cache = ArtworkCache.load(cfg.cache_dir, device(), expect=cfg.tower if expect_tower else None,
                                  data_dir=data_dir or cfg.data_dir,
                                  tokens_per_artwork=cfg.cache.tokens_per_artwork)
    return StageInputs(contract, ExampleBuilder(contract, cfg.prompt), cache)


def native_bf16(dev: torch.device | None = None) -> tuple[bool, str]:
    """Whether bf16 is native on ``dev`` (default: the training device), and what was found.

    On a CPU without AVX-512-bf16 or AMX, bf16 autocast emulates bf16 matmuls, which is slower than
    fp32 there.
    """
    dev = dev or device()
    if dev.type == "cuda":
        ok = bool(torch.cuda.is_bf16_supported())
        return ok, f"{torch.cuda.get_device_name(dev)}: bf16 {'supported' if ok else 'not supported'}"
    avx = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    found = [name for name, on in (("avx512_bf16", avx), ("amx", amx)) if on]
    return bool(found), f"CPU with {', '.join(found) if found else 'no avx512_bf16 or amx'}"


_said: set[tuple[str, object]] = set()


def use_bf16(setting: bool | str | None, what: str = "") -> bool:
    """A ``bf16`` config field: ``auto`` (or None) = on where bf16 is native (``native_bf16``); true/false win.

    Says the choice once per process and purpose (``what``), on the main process only.
    """
    if setting is None or setting == "auto":
        on, why = native_bf16()
        reason = f"auto: {why}"
    else:
        on, reason = bool(setting), "set in the config"
    if on:
        import warnings

        # Under CPU autocast, RMSNorm gets a bf16 input and its fp32 weight, and torch warns once per process that
        # it cannot use the fused kernel; the unfused one gives the same result, so the warning says nothing here.
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)
    if what and (what, on) not in _said:
        _said.add((what, on))
        from mmart.log import say

        say(f"[mmart] {what}: bf16 autocast {'on' if on else 'off'} ({reason})")
    return on


def examples_budget(stage_cfg, what: str = "") -> int:
    """The stage's ``max_examples``, or its ``max_examples_fp32`` where it trains in fp32 on a CPU.

    The fp32 path of a CPU without native bf16 is slower per step; a smaller budget there keeps
    the main job's time, at a stated cost in decisions. Says so once (``what``) when it applies.
    """
    cap = getattr(stage_cfg, "max_examples_fp32", 0)
    if not cap or device().type != "cpu" or use_bf16(stage_cfg.bf16):
        return stage_cfg.max_examples
    if what and (what, "budget") not in _said:
        _said.add((what, "budget"))
        from mmart.log import say

        say(f"[mmart] {what}: fp32 on a CPU: at most {cap} examples ({what}.max_examples_fp32), not "
            f"{stage_cfg.max_examples or 'all'} ({what}.max_examples, the bf16 path's budget)")
    return cap


def report_to(setting: str) -> list[str]:
    """``report_to`` as TrainingArguments takes it, refusing (one line) a tracker that is not installed."""
    from mmart.errors import UserError

    trackers = [t.strip() for t in setting.split(",") if t.strip() and t.strip() != "none"]
    for t in trackers:
        if t not in ("all",) and not importlib.util.find_spec({"trackio": "trackio", "tensorboard": "tensorboard",
                                                               "wandb": "wandb", "mlflow": "mlflow"}.get(t, t)):
            raise UserError(f"report_to={t!r}: {t} is not installed; install it (pip install -e '.[{t}]' for "
                            "tensorboard or trackio) or set report_to: none")
    return trackers or ["none"]


def common_args(stage_cfg: StageConfig, out_dir: Path, slots: bool = False, what: str = "training",
                evaluate: bool = False) -> dict[str, Any]:
    """TrainingArguments of a stage: its config's own (``StageConfig.trainer_args``), resolved for this machine,
    and the fields every stage sets the same way.

    ``evaluate``: there is a val set; evaluate every ``eval_steps`` and at the end.

    ``slots``: prompts carry artwork slots, so every trainable weight (LoRA, the projector
    copy) takes part in every forward and DDP can skip its per-step search for unused ones
    (were one unused, DDP would raise rather than hang). Caption prompts leave the projector
    unused, so they keep the search.
    """
    on_gpu = torch.cuda.is_available()
    bf16 = use_bf16(stage_cfg.bf16, what)
    return {
        **stage_cfg.trainer_args(),
        "output_dir": str(out_dir / "checkpoints"),
        "lr_scheduler_type": "cosine",
        "logging_first_step": True,  # a curve from the first step, even for a short run
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": stage_cfg.eval_steps if evaluate else None,
        "per_device_eval_batch_size": stage_cfg.batch_size,
        "save_strategy": "steps",
        "save_total_limit": 2,
        "bf16": bf16,
        "use_cpu": not on_gpu,
        "report_to": report_to(stage_cfg.report_to),
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        "ddp_find_unused_parameters": not slots,
        "accelerator_config": trainer_accelerator_config(),
    }


def pin_mixed_precision(bf16: bool) -> None:
    """The stage's precision wins over the launcher's: an accelerate config's ``mixed_precision: bf16`` reaches
    TrainingArguments through ``ACCELERATE_MIXED_PRECISION``, which TrainingArguments only overrides when bf16 is
    on. Set once per stage process, by the stage, just before its trainer is built."""
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"


def trainer_config(config_cls: type, section: str, stage_cfg: Any, shared: dict[str, Any], **own: Any):
    """``config_cls(**shared, **own, **stage_cfg.extra)``, after refusing with one line an ``extra`` key that
    is not a field of ``config_cls`` or that mmart sets itself (``mmart.train.config.check_extra``)."""
    check_extra(stage_cfg.extra, config_cls, trainer_settings(section, [*shared, *own]), f"{section}.extra")
    return config_cls(**shared, **own, **stage_cfg.extra)




def across_ranks(accelerator, mean: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """This rank's ``mean`` over its ``count`` items (decisions, pairs) as its share of the mean over all ranks' items.

    DDP, FSDP and DeepSpeed average gradients over ranks, so each rank's loss counts equally: a rank
    holding 3 pairs would weigh as much as one holding 30. Scaled by ``count * world / total count``,
    the averaged gradient is that of the mean over every item of the step, as one process computes it.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    if world == 1:
        return mean
    local = torch.as_tensor(float(count), device=mean.device, dtype=torch.float32)
    total = accelerator.reduce(local.clone(), reduction="sum")
    return mean * (local * world / total.clamp(min=1.0)).to(mean.dtype)


def freeze_projector_if_zero_lr(model: torch.nn.Module, projector_lr: float) -> bool:
    """``projector_lr`` 0: keep the projector exactly as stage 0 (or SFT) left it.

    The aligned slots sit on the LLM's tag-word tokens; SFT at a high projector rate moves
    them off their tokens. Frozen (no gradient, not in the optimizer), the LoRA layers learn to
    read word-like slots instead. Returns whether it froze anything.
    """
    if projector_lr != 0:
        return False
    frozen = False
    for name, p in model.named_parameters():
        if PROJECTOR_ATTR in name and p.requires_grad:
            p.requires_grad_(False)
            frozen = True
    return frozen


class ProjectorLRMixin:
    """What every mmart trainer adds to its library trainer: the (new, randomly initialised) projector's own
    learning rate (LoRA keeps ``learning_rate``), and checkpoints that hold the adapter without the embeddings."""

    projector_lr: float | None = None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:  # noqa: D102 - transformers' hook
        # The slot token grows the embedding matrix by one row, so PEFT's save_embedding_layers="auto" saves
        # the whole (untrained) input and output embeddings in every checkpoint: ~2 GB for an 8B model. They
        # are rebuilt exactly on load (mmart.model.llm.add_slot_token), so the checkpoint keeps only the
        # adapter; the library's _save does the rest (state dicts gathered by the Trainer, tokenizer, args).
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        save = model.save_pretrained
        model.save_pretrained = functools.partial(save, save_embedding_layers=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # back to the class's method

    def create_optimizer(self, model=None):  # noqa: D102 - transformers' hook
        if self.optimizer is not None or self.projector_lr is None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = model if model is not None else self.model
        proj, rest = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (proj if PROJECTOR_ATTR in name else rest).append(p)
        groups = [{"params": rest, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay},
                  {"params": proj, "lr": self.projector_lr, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.args.learning_rate)
        return self.optimizer


def trainable_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable weights: equal across DDP ranks, and across a resumed and an uninterrupted run.

    The weights are gathered in full first (FSDP2, ZeRO-3 shard them): call it on every rank.
    """
    return _digest(tensor_digests(model))


def _digest(per_tensor: dict[str, str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, d in sorted(per_tensor.items()):
        h.update(name.encode())
        h.update(d.encode())
    return h.hexdigest()


def tensor_digests(model: torch.nn.Module) -> dict[str, str]:
    """Each trainable tensor's sha256 (gathered in full first): what tells which tensors two ranks disagree on."""
    import hashlib

    from mmart.train.saving import gathered_weights

    return {name: hashlib.sha256(t.float().numpy().tobytes()).hexdigest()
            for name, t in gathered_weights(model, lambda _, p: p.requires_grad).items()}


def say_digest(model: torch.nn.Module, stage: str) -> str:
    """One line, from the main process: the trainable weights' sha256 and whether every rank holds the same,
    e.g. ``[mmart sft] trainable weights sha256 <d> (same on all 2 ranks)``. Call on every rank (a gather).

    Ranks that disagree after training (a broken data-parallel sync) raise on every rank, naming the ranks.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from mmart.log import say

    per_tensor = tensor_digests(model)
    mine = _digest(per_tensor)
    state = PartialState()
    everyone = gather_object([per_tensor]) if state.num_processes > 1 else [per_tensor]
    digests = [_digest(d) for d in everyone]
    if len(set(digests)) > 1:
        ranks = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        differ = sorted(n for n in everyone[0] if len({d.get(n) for d in everyone}) > 1)
        raise RuntimeError(f"[mmart {stage}] the ranks hold different trainable weights after training ({ranks}; "
                           f"{len(differ)} of {len(everyone[0])} tensors differ, e.g. {', '.join(differ[:3])})")
    where = f"same on all {len(digests)} ranks" if len(digests) > 1 else "1 process"
    say(f"[mmart {stage}] trainable weights sha256 {mine} ({where})")
    return mine


def checkpoint_gap(folder: Path) -> str | None:
    """What a Trainer checkpoint folder lacks to be resumed from, or None when it is complete.

    ``Trainer._save_checkpoint`` writes the weights (model or adapter), then the optimizer and
    scheduler states, and ``trainer_state.json`` last; a save cut off part-way lacks one of
    them, or holds a trainer state that is not whole JSON.
    """
    from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
    from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                    SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

    weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
               ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
    if not any((folder / w).is_file() for w in weights):
        return "no model or adapter weights"
    if not any((folder / o).is_file() for o in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)):
        return f"no optimizer state ({OPTIMIZER_NAME})"
    if not (folder / SCHEDULER_NAME).is_file():
        return f"no scheduler state ({SCHEDULER_NAME})"
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINER_STATE_NAME} is not whole JSON"
    return None


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest COMPLETE checkpoint under ``out_dir/checkpoints`` (None if there is none).

    A newer one cut off mid-save (a kill while writing) is skipped with one line naming it,
    so the rerun resumes from the last whole save instead of failing on the partial one.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = out_dir / "checkpoints"
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        prefix, _, step = path.name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and path.is_dir():
            steps.append((int(step), path))
    for _, path in sorted(steps, reverse=True):
        gap = checkpoint_gap(path)
        if gap is None:
            return str(path)
        from mmart.log import say

        say(f"[mmart] skipping incomplete checkpoint {path} ({gap}; a save cut off part-way); "
            "resuming from the newest complete one")
    return None


def save_curves(log_history: list[dict], path: Path, keys: tuple[str, ...]) -> Path | None:
    """A PNG of the training curves beside the model: one panel per metric, its val series (``eval_<key>``)
    beside the training one, and the series as JSON (``curves.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(key: str) -> list[tuple[int, float]]:
        return [(h["step"], h[key]) for h in log_history if key in h and "step" in h]

    panels = {k: {"train": points(k), "val": points(f"eval_{k}")} for k in keys}
    panels = {k: {s: v for s, v in d.items() if v} for k, d in panels.items()}
    panels = {k: d for k, d in panels.items() if d}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (k, series) in zip(axes[0], panels.items()):
        for name, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if name == "val" else ".",
                    linestyle="--" if name == "val" else "-", label=name)
        ax.set_title(k.replace("_", " ")); ax.set_xlabel("step"); ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    (path.with_suffix(".json")).write_text(json.dumps(panels, indent=1))
    return path
