"""The worker fleet: per-GPU processes, CPU fallback, and two extraction workers sharing a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import submit
from pipeline.errors import FeaturefleetError
from tests.conftest import processes_marked, small_spec
from workers.fleet import fleet_plan
from workers.launcher import start_redis


def test_fleet_plan_pins_one_process_per_gpu() -> None:
    plan = fleet_plan("all", cpu_workers=2, extract_workers=1, available=["0", "1", "2"])
    gpu = [(n, q, e) for n, q, e in plan if n.startswith("gpu")]
    assert [e["CUDA_VISIBLE_DEVICES"] for _, _, e in gpu] == ["0", "1", "2"]
    assert all(q == ["ff.extract"] for _, q, _ in gpu)
    cpu = [(n, q, e) for n, q, e in plan if n.startswith("cpu")]
    assert len(cpu) == 2 and all(q == ["ff.train"] and e["CUDA_VISIBLE_DEVICES"] == ""
                                 for _, q, e in cpu)
    assert [e["CUDA_VISIBLE_DEVICES"] for n, _, e in fleet_plan("1", 1, 1, ["0", "1"])
            if n.startswith("gpu")] == ["1"]


def test_fleet_plan_without_gpus_runs_cpu_extraction() -> None:
    plan = fleet_plan("all", cpu_workers=1, extract_workers=2, available=[])
    assert [n for n, _, _ in plan] == ["extract1", "extract2", "cpu1"]
    with pytest.raises(FeaturefleetError, match=r"GPU.*3.*not found"):
        fleet_plan("3", 1, 1, ["0"])


@pytest.mark.integration
def test_two_extraction_workers_split_a_job(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "redis")
    logdir = tmp_path / "fleet-logs"
    env = {**os.environ, "FEATUREFLEET_BROKER_URL": redis.url}
    sup = subprocess.Popen(
        [sys.executable, "-c", "import sys; from workers.fleet import run_fleet; from pathlib "
         f"import Path; sys.exit(run_fleet('{redis.url}', 'all', 1, 2, logdir=Path("
         f"'{logdir}')))"],
        env={**env, "CUDA_VISIBLE_DEVICES": ""}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job = submit(small_spec(tmp_path, limit=400, shard_size=40), broker=redis.url)
        st = job.wait(timeout=300)
        assert st["status"] == "SUCCESS", st
        workers = {s["worker"] for s in job.result()["shards"]}
        assert len(workers) == 2, workers  # both extraction processes took shards
    finally:
        os.killpg(sup.pid, signal.SIGTERM)  # the supervisor stops its workers gracefully
        out, _ = sup.communicate(timeout=120)
        redis.stop()
    assert "3 worker processes" in out
    deadline = time.monotonic() + 15
    while processes_marked(str(logdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_marked(str(logdir)) == []
