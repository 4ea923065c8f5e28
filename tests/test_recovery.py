"""Recovery never touches a finished job and checks everything before it acts (fast layer: a
real redis-server, no workers: a refused recovery sends nothing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.client.api import recover
from pipeline.client.watchdog import recover_lost
from pipeline.errors import JobError, SpecError
from pipeline.jobs.records import JobStore
from pipeline.planner import make_plan
from pipeline.settings import ALLOWED_ROOTS_ENV
from tests.conftest import small_spec

JOB, OTHER = "00000000f00d", "00000000beef"


def _planned(tmp_path: Path, job_id: str = JOB) -> Path:
    plan = make_plan(small_spec(tmp_path / "out", limit=60), job_id)
    plan.save()
    return plan.job_dir


def _queued(jobs: JobStore) -> int:
    return sum(jobs.r.llen(q) for q in ("ff.extract", "ff.train"))


def test_a_finished_job_is_never_run_again(jobs: JobStore, redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _planned(tmp_path)
    (d / "report.json").write_text(json.dumps({"status": "SUCCESS"}))
    with pytest.raises(JobError, match=rf"job {JOB} finished: its report is .*nothing was sent"):
        recover(d, redis_server.url, expect_id=JOB)
    assert not jobs.exists(JOB) and _queued(jobs) == 0
    before = (d / "report.json").read_text()
    # a copy of the finished job's plan in another folder (the watchdog's --recover): skipped
    copy = tmp_path / "elsewhere" / OTHER
    copy.mkdir(parents=True)
    shutil.copy(d / "plan.json", copy / "plan.json")
    assert recover_lost(jobs, [copy.parent], redis_server.url) == []
    with pytest.raises(JobError, match=rf"holds job {JOB}, not {OTHER}"):
        recover(copy, redis_server.url, expect_id=OTHER)
    with pytest.raises(JobError, match=r"a copy of job .*own folder"):
        recover(copy, redis_server.url)
    assert not jobs.exists(JOB) and not jobs.exists(OTHER) and _queued(jobs) == 0
    assert (d / "report.json").read_text() == before


def test_a_recovery_refused_for_its_id_sends_nothing(jobs: JobStore, redis_server,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    d = _planned(tmp_path)  # a lost job: plan, no report, no record
    with pytest.raises(JobError, match=rf"holds job {JOB}, not {OTHER}.*nothing was sent"):
        recover(d, redis_server.url, expect_id=OTHER)
    assert not jobs.exists(JOB) and _queued(jobs) == 0
    jobs.create(JOB, {"name": "alive"})
    with pytest.raises(JobError, match=r"still has its record"):
        recover(d, redis_server.url, expect_id=JOB)
    assert jobs.get(JOB)["name"] == "alive"


def test_broken_job_folders_are_clear_errors(jobs: JobStore, redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _planned(tmp_path)
    (d / "plan.json").write_text("{not json")
    with pytest.raises(JobError, match=r"plan.json' is not a featurefleet plan.*fix:"):
        recover(d, redis_server.url)
    with pytest.raises(JobError, match=r"no readable plan at .*fix:"):
        recover(tmp_path / "nowhere", redis_server.url)
    from pipeline.plan import read_spec

    (d / "spec.json").unlink()
    with pytest.raises(JobError, match=r"no readable spec at .*fix: submit the job's YAML"):
        read_spec(d)


def test_recovery_honours_the_clients_allowed_roots(jobs: JobStore, redis_server,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path, monkeypatch) -> None:
    d = _planned(tmp_path)
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(tmp_path / "allowed-only"))
    with pytest.raises(SpecError, match=r"outside"):
        recover(d, redis_server.url, expect_id=JOB)
    assert not jobs.exists(JOB) and _queued(jobs) == 0
