"""scripts/bench_gpu.py on a CPU with tiny shapes: every section the GPU run has, in one process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)


@pytest.mark.slow
def test_tiny_run_measures_every_section(bench, tmp_path):
    out = tmp_path / "gpu.json"
    rc = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--peak-tflops", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["errors"] == {} and r["skipped"] == {}
    assert r["device"]["type"] == "cpu" and r["device"]["peak_source"] == "--peak-tflops"
    sft, dpo, cache = r["sft"], r["dpo"], r["cache"]
    values = [sft["tokens_per_s"], sft["mfu"], sft["peak_memory_bytes"], dpo["fast"]["pairs_per_s"],
              dpo["trl_equivalent"]["pairs_per_s"], r["choosing"]["pairs_per_s"],
              cache["decode_included"]["images_per_s"], cache["tensors_only"]["images_per_s"]]
    assert all(v > 0 for v in values), values
    assert sft["hfu"] > sft["mfu"]  # checkpointing's recomputed forward counts as hardware FLOPs only
    assert dpo["trl_equivalent"]["forward_sequences_per_step"] == 4 * dpo["pairs_per_step"]
    assert r["llm"]["trainable_params"] < r["llm"]["total_params"]


def test_budget_skips_sections_and_says_so(bench, tmp_path):
    out = tmp_path / "gpu.json"
    assert bench.main(["--tiny", "--device", "cpu", "--budget-s", "0", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["skipped"]) == {"cache", "sft", "dpo", "choosing"}


def test_model_flops_by_hand(bench):
    llm = {"num_attention_heads": 32, "hidden_size": 4096, "num_hidden_layers": 32}
    n, tokens, seq = 7_000_000_000, 1000, 649
    attn = 4 * 32 * 4096 * (seq + 1) / 2
    assert bench.step_flops(n, llm, tokens, seq, backward=True) == tokens * (4 * n + 3 * attn)
    assert bench.step_flops(n, llm, tokens, seq, backward=True, recompute=True) == tokens * (6 * n + 4 * attn)
    assert bench.step_flops(n, llm, tokens, seq, backward=False) == tokens * (2 * n + attn)


@pytest.mark.parametrize("name,flops", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_peak_table_by_device_name(bench, name, flops):
    assert bench.peak_bf16_flops(name)[0] == flops
