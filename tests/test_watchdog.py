"""The watchdog: lost messages are re-dispatched, overdue jobs fail with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import submit
from pipeline.client import watchdog
from pipeline.jobs.broker import connect
from pipeline.jobs.records import JobStore
from tests.conftest import small_spec
from workers.launcher import start_redis, start_worker, wait_for_workers

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_lost_messages_are_redispatched_and_deadlines_enforced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    redis = start_redis(tmp_path / "redis")
    procs = []
    try:
        jobs = JobStore(connect(redis.url))
        job = submit(small_spec(tmp_path, limit=150), broker=redis.url)  # no worker yet
        # Its tasks are queued: nothing to do.
        assert watchdog.check_job(jobs, job.id, redis.url, stall_s=0) == "ok"
        jobs.r.delete("ff.extract")  # the messages are lost (e.g. Redis restarted empty)
        # Not stalled for long yet: nothing to do.
        assert watchdog.check_job(jobs, job.id, redis.url, stall_s=3600) == "ok"
        assert watchdog.check_job(jobs, job.id, redis.url, stall_s=0) == "redispatched"
        assert watchdog.check_job(jobs, job.id, redis.url, stall_s=0) == "ok"  # now queued again
        logs = tmp_path / "logs"
        procs = [start_worker(redis.url, ["ff.extract"], "wx@wd", logs),
                 start_worker(redis.url, ["ff.train"], "wt@wd", logs)]
        wait_for_workers(redis.url, ["wx@wd", "wt@wd"], procs)
        st = job.wait(timeout=240)
        assert st["status"] == "SUCCESS" and st["rounds"] == 1
        assert st["collect_runs"] == 1
        # A job past its deadline fails with the reason instead of staying RUNNING.
        for p in procs:
            p.stop(timeout=10)
        procs = []
        late = submit(small_spec(tmp_path / "late", limit=100), broker=redis.url)
        monkeypatch.setenv("FEATUREFLEET_JOB_DEADLINE_S", "0.001")
        assert watchdog.check_job(jobs, late.id, redis.url).startswith("failed: deadline passed")
        st = late.status()
        assert st["status"] == "FAILED" and "deadline passed" in st["error"]
        assert watchdog.check_job(jobs, late.id, redis.url) == "final"
    finally:
        for p in procs:
            p.stop(timeout=10)
        redis.stop()
