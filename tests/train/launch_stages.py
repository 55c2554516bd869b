"""`mmart sft` then `mmart dpo` in one launched process group (tests/train/test_distributed.py).

Run as: ``accelerate launch --config_file <config> tests/train/launch_stages.py <pipeline.yaml>``.
The same CLI entry point as two separate launches, with one interpreter start-up instead of
two (most of a tiny run's time on a 2-core machine). Between the stages, the process-wide
state a second launch would start without is cleared (the process group itself is kept).
"""

from __future__ import annotations

import sys

from mmart.cli import main


def as_new_process() -> None:
    """Forget the first stage's accelerate state and transformers' handle on its DeepSpeed config: with it,
    ZeRO-3 would build the next stage's model inside ``deepspeed.zero.Init`` (partitioned at load, on one rank)."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)


if __name__ == "__main__":
    for i, stage in enumerate(("sft", "dpo")):
        if i:
            as_new_process()
        code = main([stage, "--config", sys.argv[1]], leave_group=stage == "dpo")
        if code:
            sys.exit(code)
