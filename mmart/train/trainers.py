"""Which trainer config each training stage builds, and the check of a config's ``extra`` before any stage runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl import DPOConfig, SFTConfig

from mmart.config import PipelineConfig
from mmart.train.common import common_args
from mmart.train.config import check_extra, trainer_settings
from mmart.train.dpo_fast import FastDPOConfig


def stage_trainer(cfg: PipelineConfig, section: str) -> tuple[type, dict[str, Any]]:
    """The trainer config class a stage builds and the keywords it passes beside ``common_args``.

    One place for both, so the up-front check of ``extra`` (``check_trainer_extras``) checks
    exactly what the stage passes later.
    """
    if section == "sft":
        return SFTConfig, dict(max_length=None, packing=False, dataset_kwargs={"skip_prepare_dataset": True})
    d = cfg.dpo
    if d.method == "fast":
        return FastDPOConfig, dict(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                   negatives=d.negatives)
    return DPOConfig, dict(beta=d.beta, loss_type=[d.loss_type], label_smoothing=d.label_smoothing, max_length=None)


def check_trainer_extras(cfg: PipelineConfig) -> None:
    """Refuse a bad ``sft.extra`` or ``dpo.extra`` (or tracker) before a stage writes anything.

    Every training stage (init, sft, dpo) checks both sections, so a bad ``sft.extra`` is refused
    before stage 0 writes init/model, and a bad ``dpo.extra`` before SFT trains.
    """
    for section in ("sft", "dpo"):
        stage_cfg = getattr(cfg, section)
        config_cls, own = stage_trainer(cfg, section)
        shared = common_args(stage_cfg, Path(cfg.output_dir) / section)
        check_extra(stage_cfg.extra, config_cls, trainer_settings(section, [*shared, *own]), f"{section}.extra")
