"""Celery tasks: decorator policy plus one call into :mod:`pipeline.steps` each.

Arguments and results are small JSON (plan without pixels, shard ids, paths, checksums).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from pipeline import steps
from pipeline.plan import Plan, Shard, check_plan
from pipeline.state import JobStore, connect
from workers.app import app

log = get_task_logger(__name__)
_jobs: JobStore | None = None


def job_store() -> JobStore:
    """One Redis client per worker process, made on first use (never at import)."""
    global _jobs
    if _jobs is None:
        _jobs = JobStore(connect(app.conf.broker_url, check=False, patient=True))
    return _jobs


@app.task(name="featurefleet.extract_shard", bind=True, acks_late=True)
def extract_shard(self: Task, plan: dict[str, Any], shard: dict[str, Any]) -> dict[str, Any]:
    """Run the frozen backbone over one shard and write its HDF5 file."""

    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        _inject_fault(shard)
        rate = done / max(time.perf_counter() - started, 1e-6)
        # Flower's task page shows this meta: percent and images/s of the running shard.
        self.update_state(state="PROGRESS", meta={
            "job": plan["job_id"], "shard": f"{shard['split']}-{shard['start']}-{shard['end']}",
            "done": done, "total": total, "percent": round(100 * done / max(total, 1)),
            "images_per_s": round(rate, 1)})

    p = Plan.from_dict(plan)
    check_plan(replace(p, shards=[Shard(**shard)]))  # never trust a message's paths
    return steps.run_extract(job_store(), p, Shard(**shard), progress)


def _inject_fault(shard: dict[str, Any]) -> None:
    """Chaos testing: $FEATUREFLEET_FAULT_CRASH_SHARD names a shard (split-start-end) whose
    task kills its own worker process after its first batch, as an out-of-memory kill would.
    Unset in production."""
    import os
    import signal

    target = os.environ.get("FEATUREFLEET_FAULT_CRASH_SHARD")
    if target and target == f"{shard['split']}-{shard['start']}-{shard['end']}":
        os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="featurefleet.collect", bind=True, acks_late=True)
def collect(self: Task, results: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """Chord body after extraction: check every shard of the plan is stored and valid."""
    return steps.run_collect(job_store(), Plan.from_dict(plan), steps.as_list(results))


@app.task(name="featurefleet.sweep_probe", bind=True, acks_late=True)
def sweep_probe(self: Task, collected: Any, plan: dict[str, Any], index: int) -> dict[str, Any]:
    """One slice of the probe's regularization grid, scored on the validation split."""
    return steps.run_sweep(job_store(), Plan.from_dict(plan), index)


@app.task(name="featurefleet.train_probe", bind=True, acks_late=True)
def train_probe(self: Task, slices: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """Select the penalty from the sweep slices (chord body) and fit every head."""
    sweep = steps.as_list(slices) if plan["spec"]["probe"]["l2"] is None else None
    p = Plan.from_dict(plan)
    check_plan(p)
    return steps.run_train(job_store(), p, sweep)


@app.task(name="featurefleet.evaluate", bind=True, acks_late=True)
def evaluate(self: Task, trained: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Evaluate on the test shards and write report.json."""
    return steps.run_evaluate(job_store(), Plan.from_dict(plan), trained)


@app.task(name="featurefleet.fail_job", acks_late=True)
def fail_job(request: Any, exc: Any, traceback: Any, job_id: str) -> None:
    """Error callback of the job canvas: mark the job FAILED with the failing task's error."""
    steps.run_fail(job_store(), job_id, getattr(request, "id", "?"),
                   f"{type(exc).__name__}: {exc}")
