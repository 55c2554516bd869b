"""SFT -> DPO -> predict -> eval on the tiny world with a tiny random LLM: resume, 2 processes, round trips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from mmart.config import CONFIG_ROOT

from _runs import digest_line, with_out  # noqa: E402 - tests/train/_runs.py


class Interrupt(TrainerCallback):
    """Simulates a crash after the step-2 checkpoint was written."""

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated crash")


def test_interrupted_sft_resumes_to_the_same_weights(cfg, tmp_path, capfd):
    from mmart.train.sft import run_sft

    run_sft(with_out(cfg, tmp_path / "whole"))
    whole = digest_line(capfd.readouterr().out)[0]
    broken = with_out(cfg, tmp_path / "broken")
    with pytest.raises(KeyboardInterrupt):
        run_sft(broken, callbacks=[Interrupt()])
    checkpoint = tmp_path / "broken" / "sft" / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_dir()
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:  # the adapter, not the embeddings
        names = list(f.keys())
    assert any("lora_" in n for n in names) and not any("embed_tokens" in n or "lm_head" in n for n in names), names
    assert not (tmp_path / "broken" / "sft" / "model").exists()
    capfd.readouterr()
    run_sft(broken)
    out = capfd.readouterr().out
    assert "resuming from" in out
    assert digest_line(out)[0] == whole


def _sft_process(c, folder: Path, home: Path) -> subprocess.Popen:
    """`mmart sft --config <folder>/cfg.yaml` (``c`` written out) in a process of its own, one torch thread."""
    import yaml

    from mmart.config import to_dict

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.yaml").write_text(yaml.safe_dump(to_dict(c)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MMART_HOME": str(home),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmart.cli", "sft", "--config", str(folder / "cfg.yaml")],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _complete_state(path: Path) -> bool:
    """trainer_state.json is the last file the Trainer writes into a checkpoint, and not atomically: wait for all of it."""
    import json

    try:
        return "global_step" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_sigkilled_sft_resumes_to_the_same_weights(cfg, tmp_path, home):
    """A real kill -9 right after checkpoint-2 is complete; the rerun resumes from it and ends with the weights of
    a run never killed."""
    whole = _sft_process(with_out(cfg, tmp_path / "whole"), tmp_path / "whole", home)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    expected = digest_line(out)[0]

    broken = with_out(cfg, tmp_path / "broken")
    state = tmp_path / "broken" / "sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    proc = _sft_process(broken, tmp_path / "broken", home)
    try:
        while proc.poll() is None and not _complete_state(state):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert not (tmp_path / "broken" / "sft" / "model").exists()

    rerun = _sft_process(broken, tmp_path / "broken", home)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"[mmart sft] resuming from {state.parent}" in out.splitlines(), out[-2000:]
    assert digest_line(out)[0] == expected


def test_sft_dpo_predict_eval(cfg, tmp_path):
    from mmart.eval.report import evaluate
    from mmart.model.checkpoint import load_chooser
    from mmart.predict import predict
    from mmart.train.dpo import run_dpo
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path)
    sft_dir = run_sft(c)
    assert (sft_dir / "curves.png").is_file() and (sft_dir / "adapter_model.safetensors").is_file()
    dpo_dir = run_dpo(c)
    assert (tmp_path / "sft" / "merged" / "mmart_chooser.json").is_file()
    assert (dpo_dir / "curves.png").is_file()

    preds = predict(dpo_dir, c.data_dir, "test", tmp_path / "p.parquet", progress=False)
    assert np.allclose([sum(p) for p in preds.probs], 1.0, atol=1e-5)
    assert np.mean([max(p) - min(p) for p in preds.probs]) > 1e-3  # each candidate scored at its own position
    assert set(preds.choice) <= {a for c_ in preds.candidates for a in c_}
    again = predict(dpo_dir, c.data_dir, "test", None, progress=False)  # a fresh load scores identically
    assert [list(p) for p in again.probs] == [list(p) for p in preds.probs]
    uniform = predict(dpo_dir, c.data_dir, "test", None, progress=False, slice_="uniform")
    by_pair = preds.groupby(["user_id", "title_id"]).logging_policy.apply(lambda s: (s == "uniform").any())
    assert set(uniform.groupby(["user_id", "title_id"]).size().index) == set(by_pair[by_pair].index)

    # The saved DPO adapter is stacked on SFT's base: switched off, it is that base, as SFT's switched off is.
    dpo_model, tok, _ = load_chooser(dpo_dir)
    sft_model, _, _ = load_chooser(sft_dir)
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), dpo_model.disable_adapter(), sft_model.disable_adapter():
        torch.testing.assert_close(dpo_model(input_ids=ids).logits, sft_model(input_ids=ids).logits)

    report = evaluate(c.data_dir, {"model": tmp_path / "p.parquet"}, tmp_path / "eval", n_boot=50)
    assert {"model", "production", "popularity", "random", "oracle"} <= set(report["policies"])
    assert (tmp_path / "eval" / "report.md").read_text().count("|") > 20
    assert (tmp_path / "eval" / "policy_values.png").is_file()


def test_letter_answers_train_with_trl_dpo(cfg, tmp_path):
    from mmart.train.dpo import run_dpo
    from mmart.train.sft import run_sft

    from mmart.errors import UserError

    with pytest.raises(UserError, match="needs prompt.answer=letter"):
        run_dpo(replace(cfg, dpo=replace(cfg.dpo, method="trl")))  # per_candidate scores have no TRL form
    c = with_out(cfg, tmp_path)
    c = replace(c, prompt=replace(c.prompt, answer="letter"))
    run_sft(c)
    c = replace(c, dpo=replace(c.dpo, method="trl"))
    assert (run_dpo(c) / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not on PATH")
def test_two_processes_agree_on_the_final_weights(cfg, tmp_path, home):
    """`accelerate launch --num_processes 2` (CPU, gloo) for a few SFT steps: DDP keeps the ranks in sync."""
    import yaml

    from mmart.config import to_dict

    c = with_out(cfg, tmp_path)
    # As the default config trains: projector frozen after stage 0, bf16 autocast.
    c = replace(c, sft=replace(c.sft, projector_lr=0.0, bf16=True))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(c)))
    cmd = ["accelerate", "launch", "--config_file", str(CONFIG_ROOT / "accelerate" / "cpu_2proc.yaml"),
           "--num_processes", "2", "-m", "mmart.cli", "sft", "--config", str(tmp_path / "cfg.yaml")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MMART_HOME": str(home)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    digests = digest_line(run.stdout)
    assert set(digests) == {0, 1}, run.stdout[-2000:]
    assert digests[0] == digests[1]
    assert run.stdout.count("[mmart sft] saved") == 1  # only the main process writes the model
    stage_lines = [line for line in run.stdout.splitlines() if line.startswith("[mmart")]
    assert len(stage_lines) > 5 and len(stage_lines) == len(set(stage_lines)), stage_lines  # each said once
    assert "(same on all 2 ranks)" in digests_line(run.stdout)

    # Issue 26.5: run by hand in one process afterwards, SFT leaves the finished model alone; without the model
    # it refuses to resume the 2-process checkpoints (their schedule would change) instead of training on.
    from mmart.artefacts import read_record
    from mmart.errors import UserError
    from mmart.train.sft import run_sft

    model = tmp_path / "sft" / "model"
    assert read_record(model)["launch"] == {"processes": 2}
    assert run_sft(c) == model and read_record(model)["launch"] == {"processes": 2}
    model.rename(tmp_path / "sft" / "model-old")
    with pytest.raises(UserError, match=r"processes 2 \(checkpoints\) vs 1 \(now\).*with 2 process\(es\)"):
        run_sft(c)


def digests_line(text: str) -> str:
    return next(line for line in text.splitlines() if "trainable weights sha256" in line)


def test_text_only_variant_trains_and_scores_without_a_cache(cfg, tmp_path):
    """prompt.artwork_input=caption (the paper's text-only variant): same SFT, DPO and predict code, no slots."""
    from mmart.predict import predict
    from mmart.train.dpo import run_dpo
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path)
    c = replace(c, prompt=replace(c.prompt, artwork_input="caption"), cache=replace(c.cache, dir=str(tmp_path / "none")))
    dpo_dir = run_dpo(c, run_sft(c))
    preds = predict(dpo_dir, c.data_dir, "test", None, progress=False)
    assert np.allclose([sum(p) for p in preds.probs], 1.0, atol=1e-5)
    assert not (tmp_path / "none").exists()  # no cache was needed or built


def test_projector_lr_zero_trains_lora_and_keeps_the_stage0_projector(cfg, tmp_path):
    from mmart.model.checkpoint import load_chooser
    from mmart.model.chooser import chooser_projector, set_artwork_cache
    from mmart.train.common import load_inputs
    from mmart.train.init import build_model
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path)
    c = replace(c, sft=replace(c.sft, projector_lr=0.0, max_examples=6))
    trained, _, _ = load_chooser(run_sft(c))
    inputs = load_inputs(c)
    fresh, _ = build_model(c, inputs.cache, inputs.contract)  # seeded: the same stage-0 projector
    set_artwork_cache(trained, inputs.cache.embeddings)
    vectors = inputs.cache.embeddings.float()
    with torch.no_grad():
        torch.testing.assert_close(chooser_projector(trained)(vectors), chooser_projector(fresh)(vectors))
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # LoRA B starts at 0: it did train
