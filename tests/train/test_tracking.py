"""Validation during SFT and DPO (loss, choice accuracy, the demo world's true value), curves, report_to."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest

from mmart.errors import UserError

from _runs import with_out  # noqa: E402 - tests/train/_runs.py


def test_sft_and_dpo_evaluate_on_val_and_plot_it(cfg, tmp_path):
    from mmart.train.dpo import run_dpo
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path)
    c = replace(c, sft=replace(c.sft, eval_examples=6, eval_steps=0.5),
                dpo=replace(c.dpo, eval_examples=4, eval_steps=0.5, batch_size=1))
    sft_dir = run_sft(c)
    state = json.loads(sorted((tmp_path / "sft" / "checkpoints").glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert evals and {"eval_choice_accuracy", "eval_true_value"} <= set(evals[-1])
    assert 0 < evals[-1]["eval_true_value"] < 1  # expected play of the greedy choice on val pairs
    curves = json.loads((sft_dir / "curves.json").read_text())
    assert {"train", "val"} <= set(curves["loss"]) and "val" in curves["true_value"]
    assert (sft_dir / "curves.png").stat().st_size > 5000

    dpo_dir = run_dpo(c)
    curves = json.loads((dpo_dir / "curves.json").read_text())
    assert {"train", "val"} <= set(curves["loss"]) and "val" in curves["true_value"]
    assert len(curves["loss"]["train"]) >= 2  # the first step is logged too: a line, not a point


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_report_to_an_absent_tracker_is_one_line(cfg, tmp_path):
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path)
    with pytest.raises(UserError, match=r"tensorboard is not installed; install it \(pip install -e '\.\[tensorboard\]'"):
        run_sft(replace(c, sft=replace(c.sft, report_to="tensorboard")))
