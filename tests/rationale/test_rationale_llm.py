"""The llm teacher on a tiny random chat LM: deterministic, resumable after a kill, the same on 2 processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mmart.config import CONFIG_ROOT, to_dict
from mmart.rationale.stage import run_rationales

REPO = Path(__file__).resolve().parents[2]


def _table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


class Stop(Exception):
    pass


def test_a_killed_run_resumes_from_its_finished_shards_and_writes_what_one_run_writes(rcfg, tmp_path, one_thread):
    whole = _table(run_rationales(rcfg, "llm", tmp_path / "whole"))
    assert len(whole) == 24 and {r["teacher"] for r in whole} == {"llm"}
    assert all(isinstance(r["rationale"], str) for r in whole)

    def stop_after_first(i: int) -> None:
        raise Stop(i)

    out = tmp_path / "killed"
    with pytest.raises(Stop):
        run_rationales(rcfg, "llm", out, on_shard=stop_after_first)
    first = out / "shards" / "shard-00000.parquet"
    assert first.is_file() and not (out / "rationales.parquet").exists()
    stamp = first.stat().st_mtime_ns

    written: list[int] = []
    resumed = _table(run_rationales(rcfg, "llm", out, on_shard=written.append))
    assert written == [1, 2, 3, 4]  # 24 decisions in shards of 5: shard 0 was kept
    assert first.stat().st_mtime_ns == stamp
    assert resumed == whole  # greedy decoding: deterministic, whatever run wrote each shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two interpreters start (~30 s on 2 busy cores)
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not on PATH")
def test_two_processes_write_the_table_one_process_writes(rcfg, tmp_path, one_thread):
    one = _table(run_rationales(rcfg, "llm", tmp_path / "one"))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(rcfg)))
    out = tmp_path / "two"
    cmd = ["accelerate", "launch", "--config_file", str(CONFIG_ROOT / "accelerate" / "cpu_2proc.yaml"),
           "--main_process_port", str(_free_port()), "-m", "mmart.cli", "rationales",
           "--config", str(tmp_path / "pipeline.yaml"), "--teacher", "llm", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "over 2 process(es)" in run.stdout
    assert _table(out / "rationales.parquet") == one


def test_a_model_that_is_not_a_local_folder_is_refused(rcfg, tmp_path):
    from dataclasses import replace

    from mmart.errors import UserError

    cfg = replace(rcfg, rationale=replace(rcfg.rationale, model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    with pytest.raises(UserError, match="not a local model folder"):
        run_rationales(cfg, "llm", tmp_path / "r")
