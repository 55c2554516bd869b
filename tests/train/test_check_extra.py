"""``sft.extra`` / ``dpo.extra``: any trainer field mmart does not set passes; others are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from trl import DPOConfig, SFTConfig

from mmart.config import ConfigError
from mmart.train.common import common_args
from mmart.train.config import DPOStageConfig, SFTStageConfig, check_extra, trainer_settings


def _sets(section: str, stage_cfg, tmp_path: Path, *own: str) -> dict[str, str]:
    return trainer_settings(section, [*common_args(stage_cfg, tmp_path), *own])


def test_a_field_mmart_does_not_set_passes_and_reaches_the_trainer_args(tmp_path):
    extra = {"max_grad_norm": 0.5, "optim": "adamw_torch", "dataset_num_proc": 1}
    shared = common_args(SFTStageConfig(), tmp_path)
    check_extra(extra, SFTConfig, _sets("sft", SFTStageConfig(), tmp_path, "max_length", "packing"), "sft.extra")
    args = SFTConfig(**shared, **extra)  # what check_extra accepts is a valid keyword of the class
    assert args.max_grad_norm == 0.5 and args.dataset_num_proc == 1


def test_a_field_mmart_sets_names_the_mmart_key(tmp_path):
    sets = _sets("sft", SFTStageConfig(), tmp_path, "weight_decay")
    with pytest.raises(ConfigError, match=r"^sft\.extra\.learning_rate: mmart sets SFTConfig\.learning_rate itself; "
                                          r"use sft\.lr instead$"):
        check_extra({"learning_rate": 1e-3}, SFTConfig, sets, "sft.extra")
    with pytest.raises(ConfigError, match=r"sft\.extra\.per_device_train_batch_size: .*use sft\.batch_size instead"):
        check_extra({"per_device_train_batch_size": 4}, SFTConfig, sets, "sft.extra")
    with pytest.raises(ConfigError, match=r"sft\.extra\.save_total_limit: .*remove it from sft\.extra \(fixed by mmart\)"):
        check_extra({"save_total_limit": 5}, SFTConfig, sets, "sft.extra")
    # The deprecated alias of a field mmart sets would override it inside the trainer's config.
    with pytest.raises(ConfigError, match=r"sft\.extra\.gradient_checkpointing: mmart sets SFTConfig\.activation_checkpointing "
                                          r"\(the same setting\) itself; use sft\.gradient_checkpointing instead"):
        check_extra({"gradient_checkpointing": True}, SFTConfig, sets, "sft.extra")


def test_dpo_knobs_map_to_the_dpo_section(tmp_path):
    sets = _sets("dpo", DPOStageConfig(), tmp_path, "beta", "loss_type", "label_smoothing", "max_length")
    with pytest.raises(ConfigError, match=r"^dpo\.extra\.beta: mmart sets DPOConfig\.beta itself; use dpo\.beta instead$"):
        check_extra({"beta": 0.3}, DPOConfig, sets, "dpo.extra")
    # A DPOConfig-only field, and weight_decay (no dpo key: DPO leaves it to extra), pass.
    check_extra({"use_weighting": True, "weight_decay": 0.01}, DPOConfig, sets, "dpo.extra")
    with pytest.raises(ConfigError, match=r"^sft\.extra\.use_weighting: not a field of SFTConfig"):
        check_extra({"use_weighting": True}, SFTConfig, _sets("sft", SFTStageConfig(), tmp_path), "sft.extra")


def test_a_key_that_is_no_field_suggests_the_nearest(tmp_path):
    sets = _sets("sft", SFTStageConfig(), tmp_path)
    with pytest.raises(ConfigError, match=r"^sft\.extra\.max_grad_nrom: not a field of SFTConfig; "
                                          r"did you mean 'max_grad_norm'\?$"):
        check_extra({"max_grad_nrom": 1.0}, SFTConfig, sets, "sft.extra")
    with pytest.raises(ConfigError, match=r"learnig_rate: not a field of SFTConfig; did you mean 'learning_rate'\? "
                                          r"\(mmart sets that one: use sft\.lr instead\)"):
        check_extra({"learnig_rate": 1.0}, SFTConfig, sets, "sft.extra")
    with pytest.raises(ConfigError, match=r"extra\.beta: not a field of SFTConfig"):
        check_extra({"beta": 0.1}, SFTConfig, sets)


@pytest.mark.parametrize("stage, bad", [("sft", "sft.extra={seed: 3}"), ("init", "dpo.extra={beta: 0.3}")])
def test_a_refused_extra_writes_nothing(cfg, tmp_path, capsys, stage, bad):
    """Issue 26.7: `mmart sft --set sft.extra={seed: 3}` refused only after stage 0 had written init/model and
    sft/checkpoints/made_from.json. The whole config (both stages' extra) is checked before any stage writes."""
    import yaml

    from mmart.cli import main
    from mmart.config import to_dict

    from _runs import with_out  # noqa: E402 - tests/train/_runs.py

    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(to_dict(with_out(cfg, out))))
    capsys.readouterr()
    assert main([stage, "--config", str(config), "--set", bad]) == 1
    err = capsys.readouterr().err.strip()
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    assert err.count("\n") == 0 and err.startswith(f"mmart {stage}: error: {bad.split('=')[0]}."), err
