"""``mmart <stage>``: one subcommand per pipeline stage.

Run as: ``mmart --help`` (lists the stages) or ``mmart <stage> --help``.

Each stage lives in its own module exposing ``register(subparsers)``; heavy imports
(torch, transformers) happen inside the handlers, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Stage modules in pipeline order; each adds its subcommand(s).
STAGE_MODULES = (
    "mmart.data.cli",  # world, validate
    "mmart.vision.cli",  # vision, cache
    "mmart.train.cli",  # init, sft, dpo, export, predict
    "mmart.rationale.cli",  # rationales (a teacher's justification of each SFT decision's target)
    "mmart.eval.cli",  # eval
    "mmart.review.cli",  # review
    "mmart.status",  # status (which stages are up to date with the config and inputs; used by scripts/train.sh)
    "mmart.plan",  # plan (parameters and memory per GPU of a config, on the meta device)
    "mmart.config_cli",  # config (print or explain a config; used by scripts/train.sh)
)


def report_problems(subject: object, problems: list, ok: str) -> int:
    """Print every problem (stderr) and return 1, or print ``ok`` and return 0: validate and verify share this."""
    if problems:
        print(f"{subject}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{subject}: {ok}")
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse sizes the help column from subcommand names one indent short of where it prints them, so a name
    past 8 letters (``rationales``) would sit alone on its line; sized where they are printed, each keeps its help
    beside it."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        for sub in action._choices_actions if isinstance(action, argparse._SubParsersAction) else ():
            width = len(self._format_action_invocation(sub)) + self._current_indent + self._indent_increment
            self._action_max_length = max(self._action_max_length, width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmart",
        description=(
            "Post-train a multimodal LLM to choose, for each member and title, the artwork the member\n"
            "is most likely to play.\n\n"
            "Stages, in pipeline order:\n"
            "  world -> validate -> vision adapt -> cache build -> init -> sft -> dpo -> predict -> eval -> review\n"
            "plus status (which stages are up to date), export (a standalone merged model), plan (parameters\n"
            "and memory per GPU, without loading the model), config (print a resolved config; --fields\n"
            "lists every setting with its help) and rationales (a teacher's justification of each SFT\n"
            "decision's target). `bash scripts/train.sh` runs the pipeline; `mmart <stage>\n"
            "--help` explains a stage; docs/ explains the data contract, the pipeline and the report."
        ),
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a stage not built yet
                continue
            raise
        module.register(sub)
    return parser


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None, leave_group: bool = True) -> int:
    """``mmart <stage>``. ``leave_group=False`` keeps a launched process group for a next stage in the same
    process (tests/train/launch_stages.py); a real launch leaves it once its stage has succeeded."""
    # Before torch loads: idle OpenMP threads sleep instead of spinning. On 2 cores shared with
    # DataLoader workers or another job, spinning threads take cores from the ones doing the work.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        # DeepSpeed (an optional extra, imported by accelerate and transformers when installed) warns "Setting
        # accelerator to CPU ... unable to detect it" in every process of every stage on a CPU machine; naming
        # the CPU accelerator is the same choice, said without the warning.
        os.environ["DS_ACCELERATOR"] = "cpu"
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from mmart.errors import UserError

    try:
        code = int(args.func(args) or 0)
        from mmart.distributed import finish_distributed

        if leave_group:
            finish_distributed()  # only after success: a failed rank would leave the others waiting at the barrier
        return code
    except UserError as e:
        print(f"mmart {args.stage}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
