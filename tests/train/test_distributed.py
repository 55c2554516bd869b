"""Every config in configs/accelerate/, launched with `accelerate launch` on 2 CPU processes and a tiny Llama.

Each launch mode (DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3) runs SFT then DPO on the tiny world
(tests/train/launch_stages.py: the CLI stages, one interpreter start-up); configs/accelerate/
single_gpu.yaml runs the same data, seed and global batch in one process as the reference. The
tests check the layout each mode really trained with (FSDP: an ``FSDPModule`` with every trainable
tensor a sharded DTensor; ZeRO-3: every trainable tensor partitioned), that the saved adapter and
projector are whole, SFT's equal to the one-process run's and DPO's equal across launch modes
(against one process a known gap remains: the xfail test), that the DPO reference is the model
with its adapter off, and that the saved models predict.

The launches use test-only copies of the real configs (tmp): 2 processes instead of 8,
mixed_precision 'no' instead of bf16 (fp32, as the one-process reference), the DeepSpeed JSON by
absolute path; their parallelism content (distributed_type, fsdp_config, the JSON) is the real one.

Tolerance, in optimizer steps: each weight moves by about one Adam step per update, its group's
learning rate (SFT: LoRA 2e-4, projector copy 1e-3; DPO: 5e-5 and 2e-4), over 2 updates. Float
reduction order differs between 1 and 2 processes and between wrappers; the measured differences
were at most 0.5% of a step (SFT, ZeRO-3's projector copy against one process) and 1.7% (DPO,
ZeRO-3's projector copy against DDP). ``REL`` = 5% of a step sits far below what a rank saving its shard, a stale or zero
tensor, or a different batch would give (a whole step or more). Every process runs one thread
(the one-process reference too): stage 0's projector fit turns thread-order noise into 2e-6.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmart.config import CONFIG_ROOT, PipelineConfig, load_config, to_dict
from mmart.vision.cache import build_cache

ACCELERATE = CONFIG_ROOT / "accelerate"
REPO = CONFIG_ROOT.parent
STAGES = Path(__file__).with_name("launch_stages.py")
MODES = {"ddp": "multi_gpu_ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml",
         "zero3": "deepspeed_zero3.yaml"}
ONE_PROCESS = "single_gpu.yaml"
BATCH = 3  # per process; the one-process reference takes 2 * BATCH, the same global batch
REL = 0.05  # of one optimizer step (the tensor's learning rate)
NEEDS_DEEPSPEED = ("deepspeed is an optional extra (`DS_BUILD_OPS=0 pip install -e '.[deepspeed]'`); "
                   "without it the ZeRO configs cannot launch")

needs_launcher = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not on PATH")


def cpu_config(name: str, folder: Path, processes: int) -> Path:
    """A test-only copy of ``configs/accelerate/<name>``: ``processes`` processes, fp32, the DeepSpeed JSON by
    absolute path. Its parallelism (distributed_type, fsdp_config, deepspeed_config) is the real config's."""
    config = yaml.safe_load((ACCELERATE / name).read_text())
    config["num_processes"] = processes
    config.pop("gpu_ids", None)
    if "mixed_precision" in config:
        config["mixed_precision"] = "no"
    deepspeed = config.get("deepspeed_config") or {}
    if "deepspeed_config_file" in deepspeed:
        deepspeed["deepspeed_config_file"] = str(REPO / deepspeed["deepspeed_config_file"])
    out = folder / name
    out.write_text(yaml.safe_dump(config))
    return out


def free_port() -> int:
    """A port for the launch's rendezvous (accelerate's default 29500 may be held by another run on the box)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# One line when the ranks agree ("(all 2 ranks)", "(1 process)"), else one per rank ("(rank 1)").
LAYOUT = re.compile(r"\[mmart\] saving \S+?/(sft|dpo)/model from ([^:\[\n]+): (\d+) of (\d+) trainable tensors sharded"
                    r"[^(\n]*\((?:all (\d+) ranks|1 process|rank (\d+))\)")


@dataclass
class Run:
    out: Path
    log: str
    seconds: float
    data_dir: str
    _preds: object = None

    def layouts(self, stage: str) -> dict[int, tuple[str, int, int]]:
        """Per rank: the layout line the save printed (mode and wrapper, sharded and trainable tensor counts)."""
        found = {}
        for st, what, s, n, all_ranks, rank in LAYOUT.findall(self.log):
            if st == stage:
                ranks = range(int(all_ranks)) if all_ranks else [int(rank or 0)]
                found.update({r: (what, int(s), int(n)) for r in ranks})
        return found

    def predictions(self):
        """``mmart predict`` of the SFT model on 10 test pairs (computed once)."""
        if self._preds is None:
            from mmart.predict import predict

            self._preds = predict(self.out / "sft" / "model", self.data_dir, "test", None, progress=False,
                                  max_pairs=10)
        return self._preds

    def weights(self, stage: str) -> dict[str, torch.Tensor]:
        model = self.out / stage / "model"
        adapter = load_file(str(model / "adapter_model.safetensors"))
        projector = {f"base_projector.{k}": v for k, v in load_file(str(model / "projector.safetensors")).items()}
        return {**adapter, **projector}


def step_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], stage) -> float:
    """The largest difference between two saved choosers' tensors, in optimizer steps (the tensor's learning
    rate: the projector's own or the LoRA one); both must hold the same non-empty tensors."""
    from mmart.model.chooser import PROJECTOR_ATTR

    assert a.keys() == b.keys() and a
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape and a[k].numel() > 0, (k, a[k].shape, b[k].shape)
        lr = (stage.projector_lr if PROJECTOR_ATTR in k or k.startswith("base_projector.") else 0) or stage.lr
        worst = max(worst, float((a[k] - b[k]).abs().max()) / lr)
    return worst


@pytest.fixture(scope="module")
def cfg(tiny_world, tmp_path_factory, home) -> PipelineConfig:
    out = tmp_path_factory.mktemp("run")
    c = load_config(PipelineConfig, CONFIG_ROOT / "smoke.yaml", [
        f"data_dir={tiny_world}", f"output_dir={out}", "sft.max_examples=12", "dpo.max_examples=12",
        "sft.logging_steps=1", "dpo.logging_steps=1", "sft.save_steps=1000", "dpo.save_steps=1000",
        "sft.warmup_ratio=0", "dpo.warmup_ratio=0",  # both steps at the full rate: step 2 sees a trained policy
        # One decision per row, so every rank's batch holds as many decisions as the next (a packed row holds
        # one member's 1-8: per-rank means over unequal counts, the fast DPO gap below); fp32 everywhere.
        "sft.pack_titles=1", "dpo.pack_titles=1", "sft.bf16=false", "dpo.bf16=false", "eval.bf16=false"])
    build_cache(tiny_world, c.cache_dir, c.vision, c.cache, progress=False)
    return replace(c, cache=replace(c.cache, dir=c.cache_dir))


class Launcher:
    """Launches (once each, on demand) the configs on the tiny world; results are shared by the tests."""

    def __init__(self, cfg: PipelineConfig, folder: Path, home: Path) -> None:
        self.cfg, self.folder, self.home = cfg, folder, home
        self.runs: dict[str, Run] = {}

    def get(self, mode: str) -> Run:
        if mode not in self.runs:
            self.runs[mode] = self._launch(mode)
        return self.runs[mode]

    def _launch(self, mode: str) -> Run:
        if mode.startswith("zero"):
            pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)
        one = mode == "one"
        processes = 1 if one else 2
        batch = BATCH * 2 // processes
        out = self.folder / mode
        c = replace(self.cfg, output_dir=str(out), sft=replace(self.cfg.sft, batch_size=batch),
                    dpo=replace(self.cfg.dpo, batch_size=batch))
        out.mkdir(parents=True)
        (out / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(c)))
        config = cpu_config(ONE_PROCESS if one else MODES[mode], out, processes)
        cmd = ["accelerate", "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
               str(STAGES), str(out / "pipeline.yaml")]
        # One thread per process everywhere: the one-process reference too, so its float reductions (stage 0's
        # projector fit amplifies them to ~2e-6) are ordered like the ranks'.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MMART_HOME": str(self.home),
               "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        log = run.stdout + run.stderr
        (out / "launch.log").write_text(log)
        assert run.returncode == 0, log[-4000:]
        return Run(out, log, time.perf_counter() - start, c.data_dir)


@pytest.fixture(scope="module")
def launcher(cfg, tmp_path_factory, home) -> Launcher:
    return Launcher(cfg, tmp_path_factory.mktemp("launches"), home)


# --- the configs themselves (no launch) ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in ACCELERATE.glob("*.yaml")))
def test_cpu_copies_keep_each_configs_parallelism(name, tmp_path):
    real = yaml.safe_load((ACCELERATE / name).read_text())
    copy = yaml.safe_load(cpu_config(name, tmp_path, 2).read_text())
    for key in ("distributed_type", "fsdp_config", "use_cpu", "num_machines"):
        assert copy.get(key) == real.get(key)
    real_ds, copy_ds = real.get("deepspeed_config") or {}, copy.get("deepspeed_config") or {}
    assert real_ds.keys() == copy_ds.keys()
    if "deepspeed_config_file" in real_ds:  # the same JSON, by absolute path
        assert Path(copy_ds["deepspeed_config_file"]).read_text() == (REPO / real_ds["deepspeed_config_file"]).read_text()
    assert name in MODES.values() or name in (ONE_PROCESS, "cpu_2proc.yaml")  # every config is launched somewhere


@pytest.mark.needs_extra
@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_configs_take_batch_accumulation_clipping_and_precision_from_the_stage(name):
    """The 8B config's grad_accum 2 once clashed with a hard-coded 1; now the stage config fills every "auto"."""
    from types import SimpleNamespace

    pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)  # transformers' DeepSpeed config checks it is installed
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    real = yaml.safe_load((ACCELERATE / name).read_text())["deepspeed_config"]
    assert set(real) <= {"deepspeed_config_file", "zero3_init_flag"}  # nothing accelerate would refuse beside a JSON
    big = load_config(PipelineConfig, CONFIG_ROOT / "llama31_8b.yaml")
    args = SimpleNamespace(world_size=8, per_device_train_batch_size=big.sft.batch_size,
                           gradient_accumulation_steps=big.sft.grad_accum, max_grad_norm=0.5, learning_rate=2e-4,
                           adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                           save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=True, bf16_full_eval=False)
    ds = HfTrainerDeepSpeedConfig(str(REPO / real["deepspeed_config_file"]))
    ds.trainer_config_process(args)
    assert ds.mismatches == []  # what trainer_config_finalize would raise on (a hard-coded 1 vs grad_accum 2)
    assert ds.config["gradient_accumulation_steps"] == 2
    assert ds.config["train_batch_size"] == 8 * 16 * 2
    assert ds.config["gradient_clipping"] == 0.5 and ds.config["bf16"]["enabled"] is True
    zero = ds.config["zero_optimization"]
    assert zero["stage"] == int(name[-6])
    if zero["stage"] == 3:  # every tensor partitioned, however small: the path saving gathers is always taken
        assert zero["stage3_param_persistence_threshold"] == 0 and zero["stage3_model_persistence_threshold"] == 0
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the Trainer's checkpoints need it


# --- the launches -----------------------------------------------------------------------------------------

EXPECTED_LAYOUT = {  # mode -> (text in the layout line, every trainable tensor sharded?)
    "ddp": ("DistributedDataParallel", False),
    "fsdp": ("FSDP, FSDPModule", True),
    "zero2": ("DEEPSPEED ZeRO-2, DeepSpeedEngine", False),  # ZeRO-2 shards gradients and optimizer state only
    "zero3": ("DEEPSPEED ZeRO-3, DeepSpeedEngine", True),
}


@pytest.fixture(scope="module")
def one(launcher) -> Run:
    run = launcher.get("one")
    for stage in ("sft", "dpo"):
        assert {r: what for r, (what, _, _) in run.layouts(stage).items()} == {0: "NO, PeftModelForCausalLM"}
    return run


@needs_launcher
@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.needs_extra) if m.startswith("zero") else m
                                  for m in MODES])
def test_launch_mode_trains_saves_and_predicts_as_one_process_does(mode, launcher, one, cfg):
    from mmart.model.checkpoint import load_chooser
    from mmart.predict import predict

    run = launcher.get(mode)
    wrapper, sharded = EXPECTED_LAYOUT[mode]
    for stage in ("sft", "dpo"):
        layouts = run.layouts(stage)
        assert set(layouts) == {0, 1}, run.log[-3000:]
        for what, n_sharded, n_trainable in layouts.values():
            assert wrapper in what and n_trainable > 0
            assert n_sharded == (n_trainable if sharded else 0), what
    assert run.log.count("[mmart sft] saved") == 1 and run.log.count("[mmart dpo] saved") == 1  # written once

    # SFT: the same global batches, the same objective: the same weights.
    sft = run.weights("sft")
    assert max(float(v.abs().max()) for k, v in sft.items() if "lora_B" in k) > 1e-5  # it trained (B starts at 0)
    assert step_diff(sft, one.weights("sft"), cfg.sft) <= REL

    # DPO: whole tensors, equal across launch modes (against one process: see the xfail test below).
    dpo = run.weights("dpo")
    assert max(float(v.abs().max()) for k, v in dpo.items() if "lora_B" in k) > 1e-6
    if mode != "ddp":
        assert step_diff(dpo, launcher.get("ddp").weights("dpo"), cfg.dpo) <= REL

    # The DPO reference is the SFT model: at step 1 (adapter still zero) policy and reference agree exactly, at
    # step 2 (one update later) they differ: the reference did not follow the policy...
    margins = json.loads((run.out / "dpo" / "model" / "curves.json").read_text())["rewards/margins"]["train"]
    assert [step for step, _ in margins] == [1, 2]
    assert margins[0][1] == 0.0 and margins[1][1] != 0.0
    # ... and the saved DPO chooser stands alone: both adapters stacked on the SFT model's own base.
    dpo_model, tok, dpo_spec = load_chooser(run.out / "dpo" / "model")
    sft_model, _, sft_spec = load_chooser(run.out / "sft" / "model")
    assert dpo_spec.base_model == sft_spec.base_model
    ids = torch.tensor([tok("The member watched Alien", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), dpo_model.disable_adapter(), sft_model.disable_adapter():
        torch.testing.assert_close(dpo_model(input_ids=ids).logits, sft_model(input_ids=ids).logits)

    # The saved models predict: the SFT one as the one-process SFT model does, the DPO one a distribution.
    sft_preds = predict(run.out / "sft" / "model", cfg.data_dir, "test", None, progress=False, max_pairs=10)
    reference = one.predictions()
    assert len(sft_preds) == len(reference) > 0
    assert np.allclose(np.concatenate(sft_preds.probs), np.concatenate(reference.probs), atol=1e-5)
    preds = predict(run.out / "dpo" / "model", cfg.data_dir, "test", None, progress=False, max_pairs=10)
    assert np.allclose([sum(p) for p in preds.probs], 1.0, atol=1e-5) and len(preds) == len(reference)
    print(f"{mode}: SFT vs one process {step_diff(sft, one.weights('sft'), cfg.sft):.2g} steps, DPO vs one process "
          f"{step_diff(dpo, one.weights('dpo'), cfg.dpo):.2g} steps, {run.seconds:.0f}s")


@needs_launcher
@pytest.mark.slow
def test_fast_dpo_on_two_processes_matches_one_process(launcher, one, cfg):
    """Prompts have 1 or 2 rejected letters, so the ranks hold unequal pair counts: the loss is normalised by the
    pairs of all ranks (mmart.train.common.across_ranks), as one process averages over all of them."""
    assert step_diff(launcher.get("ddp").weights("dpo"), one.weights("dpo"), cfg.dpo) <= REL
