"""Whether a training stage has anything to do, and which of its checkpoints it may resume."""

from __future__ import annotations

import shutil
from pathlib import Path

from mmart.artefacts import fresh_checkpoints, launch_change, read_record, stale
from mmart.errors import UserError
from mmart.log import say


def up_to_date(stage: str, model_dir: Path, made: dict) -> bool:
    """Whether ``model_dir`` was made from ``made`` (the check `mmart status` makes); says so in one line if it was.

    A stage run again by hand on an up-to-date model then does nothing: resuming its final
    checkpoint under another launch trained further and overwrote the finished model.
    """
    if stale(model_dir, made):
        return False
    say(f"[mmart {stage}] {model_dir} is up to date (made from this config and these inputs, as `mmart status "
        f"--stage {stage}` says): nothing to do; pass --redo to train it again from scratch")
    return True


def resume_launch(stage: str, out: Path, made: dict, state, redo: bool = False) -> dict:
    """This launch (``{"processes": N}``), after refusing (every rank, before anything is written) to resume
    checkpoints of these inputs trained under another process count: that resume trains another schedule."""
    checkpoints = out / "checkpoints"
    launch = {"processes": state.num_processes}
    change = None if redo else launch_change(checkpoints, made, launch)
    if change:
        was = (read_launch(checkpoints) or {}).get("processes")
        raise UserError(f"{checkpoints} holds a run of this config trained under another launch ({change}); resuming it "
                        f"would train another schedule (the step count follows the processes). Launch `mmart {stage}` "
                        f"with {was} process(es) as before (as scripts/train.sh does), or pass --redo to train from "
                        f"scratch under this launch")
    return launch


def start_checkpoints(stage: str, out: Path, made: dict, state, launch: dict, redo: bool = False) -> None:
    """Keep ``out/checkpoints`` only when made from ``made`` (``fresh_checkpoints``; ``redo``: discard them),
    the main process first, and record ``launch`` beside them."""
    checkpoints = out / "checkpoints"
    with state.main_process_first():
        if redo and state.is_main_process and checkpoints.exists():
            say(f"[mmart {stage}] --redo: discarding {checkpoints}")
            shutil.rmtree(checkpoints)
        fresh_checkpoints(checkpoints, made, launch=launch)  # resume only checkpoints of these very inputs


def read_launch(checkpoints: Path) -> dict | None:
    """The launch recorded beside ``checkpoints`` (None for a record older than that)."""
    launch = (read_record(checkpoints) or {}).get("launch")
    return launch if isinstance(launch, dict) else None
