"""bf16 from the machine (issue 11.1): ``auto`` is on only where bf16 is native; true/false in a config win."""

from __future__ import annotations

import pytest
import torch

from mmart.train import common


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(common, "device", lambda: torch.device("cpu"))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(common, "_said", set())

    return set_flags


@pytest.mark.parametrize(("avx", "amx", "on"), [(True, False, True), (False, True, True), (False, False, False)])
def test_auto_is_on_only_where_the_cpu_has_native_bf16(cpu_with, capsys, avx, amx, on):
    cpu_with(avx, amx)
    assert common.use_bf16("auto", "sft") is on
    assert common.use_bf16(None) is on  # an unset field means auto
    line = capsys.readouterr().out
    assert line.count("[mmart] sft: bf16 autocast") == 1  # said once, naming what was found
    assert ("no avx512_bf16 or amx" in line) is (not on)


@pytest.mark.parametrize("native", [True, False])
def test_a_config_value_wins_over_the_machine(cpu_with, native):
    cpu_with(native, False)
    assert common.use_bf16(True) is True and common.use_bf16(False) is False


def test_the_stage_choice_reaches_the_trainer_and_overrides_the_launcher(cpu_with, tmp_path, monkeypatch):
    """An accelerate config's mixed_precision reaches TrainingArguments through ACCELERATE_MIXED_PRECISION;
    the stage's own choice must win, or fp32 on a CPU without bf16 would be silently turned back into bf16.
    Building the arguments changes no environment; the stage pins the variable itself, once."""
    import os

    from mmart.train.config import SFTStageConfig

    cpu_with(False, False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    shared = common.common_args(SFTStageConfig(bf16="auto"), tmp_path)
    assert shared["bf16"] is False
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"  # no side effect of building arguments
    common.pin_mixed_precision(shared["bf16"])
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"


@pytest.mark.parametrize(("native", "bf16", "expected"), [
    (True, "auto", 1400),   # the bf16 path: the full budget
    (False, "auto", 600),   # a CPU without native bf16: fp32, the fp32 budget
    (True, False, 600),     # fp32 forced by the config: the same path, the same budget
    (False, True, 1400),    # bf16 forced: the bf16 budget
])
def test_the_fp32_path_of_a_cpu_trains_on_its_own_budget(cpu_with, capsys, native, bf16, expected):
    from types import SimpleNamespace

    cpu_with(native, False)
    stage = SimpleNamespace(max_examples=1400, max_examples_fp32=600, bf16=bf16)
    assert common.examples_budget(stage, "sft") == expected
    assert ("sft.max_examples_fp32" in capsys.readouterr().out) is (expected == 600)  # said when it applies
    assert common.examples_budget(SimpleNamespace(max_examples=1400, max_examples_fp32=0, bf16=bf16)) == 1400
