"""Nothing stale: a stage reruns when what it is made from changed, and never resumes or reuses other inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmart.artefacts import made_from, read_record, stale
from mmart.status import stage_status

from _runs import digest_line, with_out  # noqa: E402 - tests/train/_runs.py


def _adapter(model_dir: Path) -> dict:
    return load_file(str(model_dir / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_a_changed_sft_config_retrains_from_scratch_not_from_old_checkpoints(cfg, tmp_path, capfd):
    """Issue 12.1: after sft.lr changes, SFT discards the old run's checkpoints instead of resuming them."""
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path / "run")
    first = _adapter(run_sft(c))
    assert not stale(tmp_path / "run" / "sft" / "model", made_from(c, "sft"))
    changed = replace(c, sft=replace(c.sft, lr=c.sft.lr * 5))
    assert stage_status(changed, "sft")[str(tmp_path / "run" / "sft" / "model")]  # status: must run
    capfd.readouterr()
    second = _adapter(run_sft(changed))
    out = capfd.readouterr().out
    assert "discarding" in out and "resuming from" not in out
    assert not _same(first, second)
    fresh = _adapter(run_sft(with_out(changed, tmp_path / "fresh")))
    assert _same(second, fresh)  # exactly what a run from scratch with the new lr gives


def test_settings_that_shape_nothing_keep_the_stage(cfg, tmp_path):
    c = with_out(cfg, tmp_path)
    wanted = made_from(c, "sft")
    assert wanted == made_from(replace(c, sft=replace(c.sft, logging_steps=7, save_steps=9)), "sft")
    assert wanted != made_from(replace(c, prompt=replace(c.prompt, max_history=1)), "sft")


def test_dpo_merges_the_sft_model_again_when_sft_changed(cfg, tmp_path):
    """Issue 12.2: the merged SFT model DPO starts from follows the SFT weights, not the folder's existence."""
    from mmart.train.dpo import merged_sft
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path)
    sft_dir = run_sft(c)
    merged = merged_sft(sft_dir)
    before = load_file(str(next(merged.glob("model*.safetensors"))))
    assert merged_sft(sft_dir) == merged and read_record(merged)  # unchanged SFT: the merge is reused
    shutil.rmtree(tmp_path / "sft" / "model")
    run_sft(replace(c, sft=replace(c.sft, lr=c.sft.lr * 5)))
    after = load_file(str(next(merge_file for merge_file in merged_sft(sft_dir).glob("model*.safetensors"))))
    assert not _same(before, after)


def test_status_reports_each_stage_and_the_reason(cfg, tmp_path):
    from mmart.train.init import run_init

    c = with_out(cfg, tmp_path)
    assert stage_status(c, "init") == {str(tmp_path / "init" / "model"): ["missing"]}
    run_init(c)
    assert stage_status(c, "init") == {str(tmp_path / "init" / "model"): []}
    other = replace(c, model=replace(c.model, projector_init_steps=c.model.projector_init_steps + 1))
    (why,) = stage_status(other, "init").values()
    assert why and "projector_init_steps" in why[0]


def test_the_untrained_chooser_is_scored_only_when_asked(cfg, tmp_path):
    """eval.untrained off (the default): the predict stage neither needs nor waits for preds/init.parquet."""
    c = with_out(cfg, tmp_path)
    c = replace(c, eval=replace(c.eval, untrained=False))
    preds = tmp_path / "preds"
    assert set(stage_status(c, "predict")) == {str(preds / "dpo.parquet"), str(preds / "sft.parquet")}
    asked = replace(c, eval=replace(c.eval, untrained=True))
    assert str(preds / "init.parquet") in stage_status(asked, "predict")


def test_sft_reuses_the_stage0_projector_of_init(cfg, tmp_path, capfd):
    """Issue 11.4: stage 0 runs once (init) and SFT loads its projector; a stale init is refitted first."""
    from mmart.train.init import run_init
    from mmart.train.sft import run_sft

    c = with_out(cfg, tmp_path)
    run_init(c)
    capfd.readouterr()
    run_sft(c)
    assert "stage 0: projector aligned" not in capfd.readouterr().out  # not fitted again
    changed = replace(c, model=replace(c.model, projector_init_steps=c.model.projector_init_steps + 2))
    run_sft(changed)
    out = capfd.readouterr().out
    assert out.count("stage 0: projector aligned") == 1 and "running stage 0 once" in out
    assert not stale(tmp_path / "init" / "model", made_from(changed, "init"))


@pytest.mark.slow
def test_train_sh_reruns_a_changed_stage_and_the_later_ones_only(cfg, tmp_path, home):
    """Issue 12.1 end to end: a changed dpo setting reruns dpo, predict, eval; init and sft are kept."""
    import yaml

    from mmart.config import to_dict

    c = with_out(cfg, tmp_path / "out")
    # Several DPO steps (the first has learning rate 0 under warmup), so a changed dpo.lr changes the weights.
    c = replace(c, sft=replace(c.sft, max_examples=6), dpo=replace(c.dpo, max_examples=6, batch_size=1),
                eval=replace(c.eval, max_pairs=6, n_boot=20))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(c)))
    env = {"MMART_LAUNCH": "mmart", "MMART_HOME": str(home), "PATH": __import__("os").environ["PATH"]}

    def train(*extra):
        run = subprocess.run(["bash", "scripts/train.sh", str(config), *extra], capture_output=True, text=True,
                             env=env, cwd=Path(__file__).parents[2], timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run.stdout

    train()
    sft = _adapter(tmp_path / "out" / "sft" / "model")
    dpo = _adapter(tmp_path / "out" / "dpo" / "model")
    data = yaml.safe_load(config.read_text())
    data["dpo"]["lr"] = data["dpo"]["lr"] * 3
    config.write_text(yaml.safe_dump(data))
    out = train()
    assert "init: up to date" in out and "sft: up to date" in out, out
    assert "dpo -> " in out and "eval -> " in out, out
    assert _same(sft, _adapter(tmp_path / "out" / "sft" / "model"))
    assert not _same(dpo, _adapter(tmp_path / "out" / "dpo" / "model"))
    out = train("--redo", "sft")
    assert "init: up to date" in out and "sft -> " in out and "dpo -> " in out
    assert json.loads((tmp_path / "out" / "sft" / "model" / "made_from.json").read_text())["stage"] == "sft"
