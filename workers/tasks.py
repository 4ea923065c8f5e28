"""Celery tasks: decorator policy plus one call into :mod:`pipeline.steps` each.

Arguments and results are small JSON (plan without pixels, shard ids, paths, checksums).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from typing import Any

from celery import Task
from celery.signals import worker_ready
from celery.utils.log import get_task_logger

from pipeline import steps
from pipeline.plan import Plan, Shard, check_plan
from pipeline.state import JobStore, connect
from workers.app import app
from workers.settings import EXTRACT_QUEUE, TASK_TIME_LIMIT_S

log = get_task_logger(__name__)
_jobs: JobStore | None = None


def job_store() -> JobStore:
    """One Redis client per worker process, made on first use (never at import)."""
    global _jobs
    if _jobs is None:
        _jobs = JobStore(connect(app.conf.broker_url, check=False, patient=True))
    return _jobs


@worker_ready.connect
def announce(sender: Any = None, **_: Any) -> None:
    """Record this worker's GPUs in Redis (``ff:fleet``) so ``strategy: auto`` knows the
    compute online. Read from the environment / nvidia-smi: the parent never touches CUDA."""
    from workers.runtime import list_gpus

    name = getattr(sender, "hostname", None) or "?"
    job_store().announce_worker(name, len(list_gpus()))


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
    check_plan(replace(p, shards=[Shard(**shard)]), message_size=False)  # never trust paths
    return steps.run_extract(job_store(), p, Shard(**shard), progress)


def _inject_fault(shard: dict[str, Any]) -> None:
    """Chaos testing: $FEATUREFLEET_FAULT_CRASH_SHARD names a shard (split-start-end) whose
    task kills its own worker process after its first batch, as an out-of-memory kill would.
    Unset in production."""
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
    check_plan(p, message_size=False)
    return steps.run_train(job_store(), p, sweep)


@app.task(name="featurefleet.evaluate", bind=True, acks_late=True)
def evaluate(self: Task, trained: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Evaluate on the test shards and write report.json."""
    return steps.run_evaluate(job_store(), Plan.from_dict(plan), trained)


# A fine-tuning task hands over to a fresh task after this many seconds (checkpoint first), so
# no single delivery runs near the time limit or the visibility timeout.
FINETUNE_SLICE_S = float(os.environ.get("FEATUREFLEET_FINETUNE_SLICE_S",
                                        TASK_TIME_LIMIT_S / 2))


@app.task(name="featurefleet.finetune", bind=True, acks_late=True)
def finetune(self: Task, plan: dict[str, Any], part: int = 0) -> Any:
    """Fine-tune backbone + head (GPU queue), resuming from the job's last checkpoint."""
    p = Plan.from_dict(plan)
    check_plan(p, message_size=False)

    def progress(meta: dict[str, Any]) -> None:
        # Flower's task page shows this meta: epoch, step, loss, val accuracy, images/s.
        self.update_state(state="PROGRESS", meta={"job": p.job_id, **meta})

    def after_checkpoint() -> None:
        # Chaos testing: kill this worker process right after the first checkpoint of the
        # first delivery, as a preemption would. Unset in production.
        if os.environ.get("FEATUREFLEET_FAULT_CRASH_FINETUNE") and \
                job_store().field(p.job_id, "attempts_seen") is None:
            job_store().update(p.job_id, attempts_seen=1)
            os.kill(os.getpid(), signal.SIGKILL)

    result = steps.run_finetune(job_store(), p, part, time.monotonic() + FINETUNE_SLICE_S,
                                progress, after_checkpoint)
    if result.get("continue"):
        log.info("job %s: fine-tuning continues in a new task (part %d)", p.job_id, part + 1)
        raise self.replace(self.app.signature(
            "featurefleet.finetune", args=(plan,), kwargs={"part": part + 1},
            queue=EXTRACT_QUEUE))
    return result


@app.task(name="featurefleet.evaluate_finetune", bind=True, acks_late=True)
def evaluate_finetune(self: Task, trained: dict[str, Any], plan: dict[str, Any]) -> Any:
    """Test metrics of the best fine-tuned epoch; writes the report."""
    return steps.run_evaluate_finetune(job_store(), Plan.from_dict(plan), trained)


@app.task(name="featurefleet.fail_job", acks_late=True)
def fail_job(request: Any, exc: Any, traceback: Any, job_id: str) -> None:
    """Error callback of the job canvas: mark the job FAILED with the failing task's error."""
    steps.run_fail(job_store(), job_id, getattr(request, "id", "?"),
                   f"{type(exc).__name__}: {exc}")
