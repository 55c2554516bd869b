"""Console lines of the stages, printed once per launch.

Under ``accelerate launch`` every process runs the same stage code, so a plain ``print`` shows
each line once per process. ``say`` prints on the main process only (global rank 0, the one
that also writes the models); ``quiet_other_ranks`` turns the libraries' own progress bars
(transformers' "Loading weights", datasets' map bars) off on the other ranks.
"""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """Global rank 0, or a plain (unlaunched) process.

    Read from the launcher's ``RANK`` variable, so it holds before any process group exists
    (torchrun, ``accelerate launch`` and the DeepSpeed launcher all set it); once accelerate's
    state exists it is asked instead.
    """
    state = sys.modules.get("accelerate.state")
    if state is not None and state.PartialState._shared_state:
        return bool(state.PartialState().is_main_process)
    return int(os.environ.get("RANK", "0") or 0) == 0


def say(*parts: object, err: bool = False) -> None:
    """``print(*parts)`` on the main process only, flushed (lines from several processes would interleave)."""
    if is_main_process():
        print(*parts, file=sys.stderr if err else sys.stdout, flush=True)


def quiet_other_ranks() -> None:
    """Turn transformers' and datasets' progress bars off on every process but the main one."""
    if is_main_process():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
