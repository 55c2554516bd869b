"""One process group for every stage, CPU or GPU, through accelerate.

accelerate's own MULTI_CPU type launches through mpirun; a plain `accelerate launch` with
the torchrun launcher (configs/accelerate/cpu_2proc.yaml) starts the processes, and this
first PartialState picks gloo on a machine without a GPU. PartialState is a singleton, so
the Trainer and every later ``PartialState()`` share this one.
"""

from __future__ import annotations


def distributed_state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
