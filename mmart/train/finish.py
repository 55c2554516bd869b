"""What SFT and DPO do once their trainer is done: save the chooser with its config, curves, record and card."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from mmart.artefacts import write_model_record
from mmart.config import PipelineConfig, to_dict
from mmart.log import say
from mmart.model.card import write_model_card
from mmart.train.common import save_curves
from mmart.train.saving import save_trained_chooser, training_facts


def pipeline_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as saved beside a model (``pipeline.yaml``): predict and serve read it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_stage_model(trainer, tokenizer, cfg: PipelineConfig, stage: str, model_dir: Path, made: dict,
                     curves: tuple[str, ...], decisions: int, rows: int, start: float,
                     stacked_on: str | Path | None = None, launch: dict | None = None) -> Path:
    """Save the trained chooser into ``model_dir`` with ``pipeline.yaml`` (every rank: the gathers are collective),
    then, on the main process, ``curves.png`` (the logged ``curves``), the record ``made`` (with the model's own
    fingerprint and the ``launch`` it trained under) and the model card.

    ``decisions``/``rows``: what the stage trained on; ``start``: its ``time.perf_counter()`` at the beginning;
    ``stacked_on``: as ``save_trained_chooser`` (DPO's SFT folder).
    """
    model_dir = save_trained_chooser(trainer, tokenizer, model_dir, stacked_on=stacked_on,
                                     files={"pipeline.yaml": pipeline_yaml(cfg)})
    if trainer.is_world_process_zero():
        save_curves(trainer.state.log_history, model_dir / "curves.png", curves)
        write_model_record(model_dir, made, launch)
        write_model_card(model_dir, training_facts(trainer, decisions, rows, time.perf_counter() - start))
        say(f"[mmart {stage}] saved {model_dir} in {time.perf_counter() - start:.0f}s")
    return model_dir
