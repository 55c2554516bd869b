"""The llm teacher on a tiny random chat LM: deterministic, resumable after a kill (an exception, or a real
SIGKILL of the process), the same on 2 processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mmart.artefacts import read_record, record_path, stale
from mmart.config import CONFIG_ROOT, apply_overrides, to_dict
from mmart.rationale.llm import shard_path
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

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = out / "shards" / f".shard-00001.parquet.tmp-{int(gone.stdout)}"  # a write its kill cut off
    live = out / "shards" / f".shard-00002.parquet.tmp-{os.getppid()}"  # another process still writing
    dead.write_bytes(b"half a parquet file")
    live.write_bytes(b"")
    written: list[int] = []
    resumed = _table(run_rationales(rcfg, "llm", out, on_shard=written.append))
    assert written == [1, 2, 3, 4]  # 24 decisions in shards of 5: shard 0 was kept
    assert not dead.exists() and live.exists()
    assert first.stat().st_mtime_ns == stamp
    assert resumed == whole  # greedy decoding: deterministic, whatever run wrote each shard


def _finished(shards: Path, clean: Path, n: int) -> dict[int, int]:
    """Shard index -> its file's mtime, for each shard of ``shards`` whose record is the clean run's."""
    return {i: shard_path(shards, i).stat().st_mtime_ns for i in range(n)
            if not stale(shard_path(shards, i), read_record(shard_path(clean, i)))}


def _kill_at_first_shard(cmd: list[str], first: Path, log: Path) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``first`` exists (polled every few ms): no clean-up runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not first.exists() and time.monotonic() < deadline:
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)  # os.kill(pid, SIGKILL), skipped by Popen if it already exited (reaped)
    code = proc.wait()
    assert first.exists() and code == -signal.SIGKILL, f"not killed after its first shard (exit {code}):\n" + \
        log.read_text()[-4000:]


@pytest.mark.slow  # an interpreter starts and generates (~20 s on 2 busy cores)
def test_a_run_killed_with_sigkill_resumes_to_the_table_one_clean_run_writes(rcfg, tmp_path, one_thread):
    """kill -9 of `mmart rationales --teacher llm` just after its first shard: the rerun keeps the finished shards,
    writes the others, and its table is the clean run's."""
    # 24 shards of 2 decisions, up to 32 tokens each: seconds of generation after the first shard (the margin)
    cfg = apply_overrides(rcfg, ["sft.max_examples=48", "rationale.shard_size=2", "rationale.batch_size=1",
                                 "rationale.max_new_tokens=32"])
    whole = _table(run_rationales(cfg, "llm", tmp_path / "whole"))
    n = len(list((tmp_path / "whole" / "shards").glob("shard-*.parquet")))
    assert n == 24 and len(whole) == 48

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    out = tmp_path / "killed"
    shards = out / "shards"
    _kill_at_first_shard([sys.executable, "-m", "mmart.cli", "rationales", "--config", str(tmp_path / "pipeline.yaml"),
                          "--teacher", "llm", "--out", str(out)], shard_path(shards, 0), tmp_path / "killed.log")
    assert shard_path(shards, 0).is_file() and not (out / "rationales.parquet").exists()
    kept = _finished(shards, tmp_path / "whole" / "shards", n)
    assert len(kept) < n, "every shard was finished when the kill came: nothing was interrupted"
    # one process writes its shards in order; shard 0 is kept unless the kill fell between its file and its record
    assert set(kept) == set(range(len(kept)))
    assert 0 in kept or not record_path(shard_path(shards, 0)).exists()

    written: list[int] = []
    resumed = _table(run_rationales(cfg, "llm", out, on_shard=written.append))
    assert written == [i for i in range(n) if i not in kept]
    assert {i: shard_path(shards, i).stat().st_mtime_ns for i in kept} == kept  # not rewritten
    assert resumed == whole  # the same rationale for every example_id, in the same order


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
