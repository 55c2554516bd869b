"""One process group for every stage, CPU or GPU, through accelerate.

accelerate's own MULTI_CPU type launches through mpirun; a plain `accelerate launch` with
the torchrun launcher (configs/accelerate/cpu_2proc.yaml) starts the processes, and this
first PartialState picks gloo on a machine without a GPU. PartialState is a singleton, so
the Trainer and every later ``PartialState()`` share this one.

Every config in configs/accelerate/ also runs on CPUs (that is how the tests prove them):

* DDP (``MULTI_GPU`` configs): gloo, as above.
* DeepSpeed: the Trainer's ``Accelerator`` switches the gloo group to DeepSpeed by itself
  (``ACCELERATE_USE_DEEPSPEED``); DeepSpeed picks its CPU accelerator.
* FSDP: accelerate applies FSDP only on top of a multi-device type (``MULTI_GPU``,
  ``MULTI_XPU``, ...), never ``MULTI_CPU``, so an FSDP launch on CPUs silently trained
  with DDP. FSDP2 itself shards over gloo, so the CPU group is presented as multi-device
  and the Trainer told to keep this state (``trainer_accelerator_config``) instead of
  building its own ``MULTI_CPU`` one.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_mode() -> str:
    """What ``accelerate launch`` asked for: ``fsdp``, ``deepspeed``, or ``ddp`` (also a plain single process)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def _cpu_fsdp() -> bool:
    import torch

    return not torch.cuda.is_available() and launched_mode() == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed_state():
    """The process group every stage shares: call before the Trainer (module docstring: each config on CPUs)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if launched_mode() == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            from mmart.errors import UserError

            raise UserError("this launch uses a DeepSpeed config (configs/accelerate/deepspeed_*.yaml) but deepspeed "
                            "is not installed: DS_BUILD_OPS=0 pip install -e '.[deepspeed]'")
        if not torch.cuda.is_available():
            _no_deepspeed_cpu_build()
    state = PartialState(cpu=not torch.cuda.is_available())
    if _cpu_fsdp() and state.distributed_type == DistributedType.MULTI_CPU:
        # Only the type changes (the device stays the CPU, the backend gloo): the Trainer's AcceleratorState
        # then turns it into FSDP, as it would on GPUs.
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return state


def finish_distributed() -> None:
    """Leave the process group together, after every rank's last write.

    A rank that reaches the end first must not exit while rank 0 still writes the model card:
    the interpreter's exit would tear the gloo group down under it, which can abort
    ("terminate called without an active exception", SIGABRT) and fail a run that had saved
    everything. A no-op in a single process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _no_deepspeed_cpu_build() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory all-reduce.

    On first use it builds a C++ op with g++ and ninja (2.5 min on 2 busy cores, and an error
    where no compiler is installed); gloo's own collectives serve instead. DeepSpeed runs on
    CPUs only as a stand-in for GPUs (the tests of configs/accelerate/deepspeed_*.yaml).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def trainer_accelerator_config() -> dict[str, Any]:
    """``TrainingArguments.accelerator_config``: keep ``distributed_state()``'s state where the Trainer's own
    (a reset, then ``PartialState(cpu=True)``) would lose it, i.e. FSDP on CPUs; else the Trainer's default."""
    return {"use_configured_state": True} if _cpu_fsdp() else {}


def _is_sharded(param) -> bool:
    """Whether this rank holds only part of ``param`` (FSDP2's DTensor shard, ZeRO-3's partition)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local().numel() < param.numel()
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel() < param.ds_numel
    return False


def sharding_summary(accelerator, model, wrapped) -> str:
    """One line on how a prepared model is laid out: the launch mode, its wrapper and how many trainable tensors
    are split across ranks, e.g. ``FSDP, FSDPModule FSDPPeftModelForCausalLM: 26 of 26 trainable tensors sharded``."""
    from torch.distributed.fsdp import FSDPModule

    kind = str(accelerator.distributed_type.value)
    if hasattr(wrapped, "zero_optimization_stage"):
        kind += f" ZeRO-{wrapped.zero_optimization_stage()}"
    wrapper = type(wrapped).__name__
    if isinstance(wrapped, FSDPModule):
        wrapper = f"FSDPModule {wrapper}"
    trainable = [p for p in model.parameters() if p.requires_grad]
    sharded = sum(_is_sharded(p) for p in trainable)
    return f"{kind}, {wrapper}: {sharded} of {len(trainable)} trainable tensors sharded"
