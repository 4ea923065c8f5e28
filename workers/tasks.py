"""Celery tasks: decorator policy plus one call into :mod:`pipeline.jobs.steps` each.

Arguments and results are small JSON (a plan reference, shard ids, slice numbers, checksums).
One retry policy (:func:`ff_task`): a :class:`~pipeline.errors.RetryableError` (a chord body
that ran before its header's results landed, a passing Redis outage) is retried with backoff;
every other error fails the task, and the canvas's error callback fails the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.signals import worker_ready
from celery.utils.log import get_task_logger

from pipeline.errors import NodeBusy, RetryableError
from pipeline.jobs import products, quality, steps, training
from pipeline.jobs.broker import connect
from pipeline.jobs.records import JobStore
from pipeline.plan import PlanMessage
from workers.app import app

log = get_task_logger(__name__)
_jobs: JobStore | None = None
RETRIES = 12  # NotReady / Redis outages: backoff 1, 2, 4 ... capped at 30 s, about 4 minutes
NODE_BUSY_RETRY_S = 10  # a second delivery of a running node task looks again this often


def job_store() -> JobStore:
    """One Redis client per worker process, made on first use (never at import)."""
    global _jobs
    if _jobs is None:
        _jobs = JobStore(connect(app.conf.broker_url, check=False, patient=True))
    return _jobs


def ff_task(name: str) -> Callable[[Callable[..., Any]], Any]:
    """The one task policy: late acks (a lost worker's task is delivered again), bound, named
    ``featurefleet.<name>``, retryable errors retried with exponential backoff."""
    policy = app.task(name=f"featurefleet.{name}", bind=True, acks_late=True,
                      autoretry_for=(RetryableError,), retry_backoff=1, retry_backoff_max=30,
                      retry_jitter=False, max_retries=RETRIES)
    return policy  # type: ignore[no-any-return]


@worker_ready.connect  # type: ignore[untyped-decorator]
def announce(sender: Any = None, **_: Any) -> None:
    """Record this worker's GPUs in Redis (``ff:fleet``) so ``strategy: auto`` knows the
    compute online. Read from the environment / nvidia-smi: the parent never touches CUDA."""
    from pipeline.devices import visible_gpus

    name = getattr(sender, "hostname", None) or "?"
    job_store().announce_worker(name, len(visible_gpus()))


@ff_task("extract_shard")
def extract_shard(self: Task, ref: PlanMessage, shard_id: str) -> None:
    """Run the frozen backbone over one shard and write its HDF5 file. Returns nothing: the
    result is in the job record, and the chord hands every header's return value to
    ``collect`` in one message (10,000 shards' dicts were 1.3 MB; 10,000 nulls are 60 kB)."""
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-6)
        # Flower's task page shows this meta: percent and images/s of the running shard.
        self.update_state(state="PROGRESS", meta={
            "job": ref.get("job_id"), "shard": shard_id, "done": done, "total": total,
            "percent": round(100 * done / max(total, 1)), "images_per_s": round(rate, 1)})

    steps.run_extract(job_store(), ref, shard_id, progress)


@ff_task("collect")
def collect(self: Task, results: Any, ref: PlanMessage) -> dict[str, Any]:
    """Chord body after extraction: check every shard of the plan is stored and valid."""
    return steps.run_collect(job_store(), ref)


@ff_task("sweep_probe")
def sweep_probe(self: Task, collected: Any, ref: PlanMessage, index: int) -> dict[str, Any]:
    """One slice of the probe's regularization grid, scored on the validation split."""
    return steps.run_sweep(job_store(), ref, index)


@ff_task("train_probe")
def train_probe(self: Task, slices: Any, ref: PlanMessage) -> dict[str, Any]:
    """Select the penalty from the recorded sweep and fit every head."""
    return steps.run_train(job_store(), ref)


@ff_task("evaluate")
def evaluate(self: Task, trained: dict[str, Any], ref: PlanMessage) -> dict[str, Any]:
    """Evaluate on the test rows and write report.json."""
    return steps.run_evaluate(job_store(), ref, trained)


@ff_task("predict")
def predict(self: Task, collected: Any, ref: PlanMessage) -> dict[str, Any]:
    """Batch prediction: the trained head over every sample's features; predictions.parquet,
    predictions.csv and the report."""
    return products.run_predict(job_store(), ref)


@ff_task("embed_export")
def embed_export(self: Task, collected: Any, ref: PlanMessage) -> dict[str, Any]:
    """Embeddings: every sample's features into embeddings.parquet and a faiss index, the
    report."""
    return products.run_embed(job_store(), ref)


@ff_task("recommend_sweep")
def recommend_sweep(self: Task, collected: Any, ref: PlanMessage, index: int) -> dict[str, Any]:
    """One penalty of the collaborative model, scored on a validation part of training."""
    return products.run_recommend_sweep(job_store(), ref, index)


@ff_task("recommend_train")
def recommend_train(self: Task, sweep: Any, ref: PlanMessage) -> dict[str, Any]:
    """Recommendation: popularity, collaborative and content models on the interactions and
    the items' features, evaluated on warm and cold items; the report."""
    return products.run_recommend(job_store(), ref, sweep if isinstance(sweep, list) else None)


@ff_task("quality_part")
def quality_part(self: Task, collected: Any = None, *, ref: PlanMessage,
                 part: str) -> dict[str, Any]:
    """One part of the data-quality stage (``neighbors.<b>``, ``fold.<f>``, ``curve.<i>``,
    ``shift``, ``probe``: the last on the GPU queue, it runs the backbone)."""
    return quality.run_part(job_store(), ref, part)


@ff_task("quality_finish")
def quality_finish(self: Task, parts: Any, ref: PlanMessage) -> dict[str, Any]:
    """The data-quality stage's summary (chord body; retried until every part is recorded)."""
    return quality.run_finish(job_store(), ref)


@ff_task("train_node")
def train_node(self: Task, ref: PlanMessage, program: str, part: int, slot: int,
               round_no: int = 0) -> dict[str, Any]:
    """One node of a training run's time slice: torchrun with this node's ranks."""

    def progress(meta: dict[str, Any]) -> None:
        # Flower's task page shows this meta: epoch, step, loss, images/s, ranks.
        self.update_state(state="PROGRESS", meta={"job": ref.get("job_id"), "program": program,
                                                  "node": slot, **meta})

    try:
        return training.run_node(job_store(), ref, program, part, slot, round_no, progress)
    except NodeBusy as exc:  # the running delivery may train for hours: no retry limit
        raise self.retry(exc=exc, countdown=NODE_BUSY_RETRY_S, max_retries=None) from None


@ff_task("train_done")
def train_done(self: Task, results: Any, ref: PlanMessage, program: str, part: int,
               round_no: int = 0) -> Any:
    """After a time slice: the run's summary, or the next slice (this task is replaced by its
    chord; the rest of the job's chain follows it)."""
    from pipeline.plan import PlanRef, load_plan
    from workers.canvas import task_ids
    from workers.canvas import training as training_canvas

    found = [r for r in (results if isinstance(results, list) else [results])
             if isinstance(r, dict)]
    out = training.run_done(job_store(), ref, program, part, found)
    if out.get("continue"):
        plan = load_plan(ref)
        canvas = training_canvas(self.app, plan, PlanRef(**ref), out["part"], round_no)
        job_store().add_task_ids(plan.job_id, task_ids(canvas))
        log.info("job %s: %s continues in a new time slice (part %d)", plan.job_id, program,
                 out["part"])
        raise self.replace(canvas)
    return out


@ff_task("finish_pretrain")
def finish_pretrain(self: Task, summary: dict[str, Any], ref: PlanMessage) -> Any:
    """Write the pretraining report; the job's encoder becomes a backbone."""
    return training.run_finish_pretrain(job_store(), ref, summary)


@ff_task("evaluate_finetune")
def evaluate_finetune(self: Task, trained: dict[str, Any], ref: PlanMessage) -> Any:
    """Test metrics of the best fine-tuned epoch; writes the report."""
    return steps.run_evaluate_finetune(job_store(), ref, trained)


@app.task(name="featurefleet.fail_job", acks_late=True)  # type: ignore[untyped-decorator]
def fail_job(request: Any, exc: Any, traceback: Any, job_id: str) -> None:
    """Error callback of the job canvas: mark the job FAILED with the failing task's error."""
    steps.run_fail(job_store(), job_id, getattr(request, "id", "?"),
                   f"{type(exc).__name__}: {exc}")
