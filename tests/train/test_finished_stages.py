"""Issue 26.5: a stage run again by hand leaves a finished model alone, never resumes under another launch,
and `mmart status` notices a model whose files changed after its record."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mmart.artefacts import read_record
from mmart.errors import UserError
from mmart.status import stage_status

from _runs import with_out  # noqa: E402 - tests/train/_runs.py


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _small(cfg, tmp_path):
    c = with_out(cfg, tmp_path)
    return replace(c, sft=replace(c.sft, max_examples=6))


def test_an_up_to_date_sft_model_is_left_alone(cfg, tmp_path, capfd):
    from mmart.train.sft import run_sft

    c = _small(cfg, tmp_path)
    model = run_sft(c)
    before = _files(model)
    capfd.readouterr()

    # Run by hand again on the finished model: one line, nothing trained or written.
    assert run_sft(c) == model
    out = capfd.readouterr().out
    assert f"[mmart sft] {model} is up to date" in out and "resuming from" not in out, out
    assert _files(model) == before
    assert read_record(model)["launch"] == {"processes": 1}


def test_resuming_checkpoints_of_another_launch_is_refused(cfg, tmp_path, capfd):
    from mmart.train.sft import run_sft

    c = _small(cfg, tmp_path)
    run_sft(c)
    # The checkpoints came from a 2-process launch (as scripts/train.sh trains on 2 CPU cores) and the model is
    # gone: resuming them in 1 process would train another schedule (10 steps became 19), so it refuses.
    record = tmp_path / "sft" / "checkpoints" / "made_from.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "launch": {"processes": 2}}))
    (tmp_path / "sft" / "model").rename(tmp_path / "sft" / "model-old")
    with pytest.raises(UserError, match=r"another launch \(processes 2 \(checkpoints\) vs 1 \(now\)\).*"
                                        r"with 2 process\(es\) as before.*--redo") as e:
        run_sft(c)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "sft" / "model").exists()
    capfd.readouterr()
    run_sft(c, redo=True)  # from scratch under this launch
    out = capfd.readouterr().out
    assert "--redo: discarding" in out and "resuming from" not in out
    assert read_record(tmp_path / "sft" / "model")["launch"] == {"processes": 1}


def test_status_notices_a_model_changed_after_its_record(cfg, tmp_path):
    from mmart.train.init import run_init

    c = with_out(cfg, tmp_path)
    model = run_init(c)
    assert stage_status(c, "init") == {str(model): []}
    projector = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    data = bytearray(projector.read_bytes())
    data[-1] ^= 0xFF  # another run (or a hand) rewrote the weights, not the record
    projector.write_bytes(bytes(data))
    (why,) = stage_status(c, "init").values()
    assert why and "weight files changed after its made_from.json was written" in why[0]
