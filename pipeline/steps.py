"""What each Celery task does, as plain functions: the work plus the job-state bookkeeping.

Tasks in ``workers/tasks.py`` are decorator policy plus one call into a function here, so the
same steps run (and are tested) without Celery.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import evaluate, extract, heads, report, store, train
from pipeline.errors import JobError
from pipeline.plan import Plan, Shard
from pipeline.state import FINAL, JobStore

log = logging.getLogger(__name__)

# A shard whose task was started this many times and never finished is a poison shard: with
# reject-on-worker-lost it would otherwise be redelivered forever.
MAX_ATTEMPTS = int(os.environ.get("FEATUREFLEET_MAX_ATTEMPTS", 3))


def run_extract(jobs: JobStore, plan: Plan, shard: Shard,
                on_progress: Any = None) -> dict[str, Any]:
    """Extract one shard, counting progress in the job record.

    Raises:
        JobCancelled: the job was cancelled (checked before and between batches).
        JobError: the shard's task started more than ``MAX_ATTEMPTS`` times: it keeps killing
            its worker (out of memory, a crashing decoder), so it fails instead of looping.
    """
    before = jobs.mark_running(plan.job_id, "extract")
    if before in FINAL:
        done = jobs.shard_results(plan.job_id).get(shard.id)
        if done is not None:  # delivered again after the job ended: nothing to change
            return {**done, "cached": True}
        raise JobCancelled(f"job {plan.job_id} is {before}; shard {shard.id} not extracted")
    attempts = jobs.attempt(plan.job_id, shard.id)
    if attempts > MAX_ATTEMPTS:
        raise JobError(f"shard {shard.id} of job {plan.job_id} was started {attempts - 1} "
                       f"times and its worker died each time (poison shard); fix: check the "
                       f"worker logs for that shard (memory, data), or lower backbone.batch_size")
    def progress(done: int, total: int) -> None:
        jobs.shard_progress(plan.job_id, shard.id, done)
        if jobs.field(plan.job_id, "status") == "CANCELLED":
            raise JobCancelled(f"job {plan.job_id} was cancelled during shard {shard.id}")
        if on_progress is not None:
            on_progress(done, total)

    try:
        result = extract.extract_shard(plan, shard, progress)
    except JobCancelled:
        raise
    except Exception as exc:  # the job's error must name the shard
        raise JobError(f"shard {shard.id}: {exc}") from exc
    jobs.record_shard(plan.job_id, result, shard.rows)
    return result


class JobCancelled(JobError):
    """The job was cancelled: stop without writing anything."""


def _live(jobs: JobStore, plan: Plan) -> None:
    status = jobs.field(plan.job_id, "status")
    if status in FINAL:
        raise JobCancelled(f"job {plan.job_id} is {status}: nothing more to do")


def _recorded(jobs: JobStore, plan: Plan) -> set[str]:
    """Shard ids this job's extraction tasks recorded (each checked on disk before use)."""
    return set(jobs.shard_results(plan.job_id))


def run_collect(jobs: JobStore, plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """After extraction: every shard of the plan must be recorded or cached, and valid."""
    _live(jobs, plan)
    jobs.incr(plan.job_id, "collect_runs")  # the chord callback must run once per job
    jobs.update(plan.job_id, stage="train", extract_finished=time.time())
    recorded = jobs.shard_results(plan.job_id)
    for split in plan.split_sizes:
        train.checked_paths(plan, split, set(recorded))
    # One summary per shard: this run's record, or (a shard cached at planning) its file.
    results = {s.id: recorded.get(s.id) or store.shard_summary(s.path) for s in plan.shards}
    entries = {Path(s.path).name: {"sha256": results[s.id]["sha256"],
                                   "rows": results[s.id]["rows"],
                                   "skipped": len(results[s.id].get("skipped", []))}
               for s in plan.shards}
    store.update_manifest(plan.shard_dir, entries, {
        "key": plan.key, "backbone": plan.spec["backbone"]["name"],
        "weights_id": plan.weights_id, "dataset_fingerprint": plan.fingerprint,
        "preprocessing": plan.preprocessing, "feature_dtype": plan.spec["backbone"][
            "feature_dtype"], "data": plan.spec["data"]})
    skipped = [sk for r in results.values() for sk in r.get("skipped", [])]
    total = sum(s.rows for s in plan.shards)
    bound = plan.job_spec.data.max_skipped_fraction
    if total and len(skipped) / total > bound:
        examples = "; ".join(f"{sk['id']}: {sk['reason']}" for sk in skipped[:5])
        raise JobError(f"{len(skipped)} of {total} samples could not be read "
                       f"({len(skipped) / total:.1%} > data.max_skipped_fraction {bound:g}), "
                       f"e.g. {examples}; fix: repair or remove those files, or raise "
                       "data.max_skipped_fraction")
    return {"shards": len(plan.shards), "extracted": len(results), "skipped": len(skipped)}


def run_sweep(jobs: JobStore, plan: Plan, index: int) -> dict[str, Any]:
    """One slice of the regularization sweep."""
    _live(jobs, plan)
    jobs.update(plan.job_id, stage="sweep")
    return train.sweep_slice(plan, _recorded(jobs, plan), index)


def run_train(jobs: JobStore, plan: Plan, slices: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Select the penalty from the sweep, fit every head on the shared splits, save them."""
    _live(jobs, plan)
    jobs.update(plan.job_id, stage="train")
    trained = train.fit_heads(plan, _recorded(jobs, plan), slices)
    jobs.update(plan.job_id, train_seconds=trained["seconds"])
    return trained


def run_evaluate(jobs: JobStore, plan: Plan, trained: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every head once on the test split; write the report; mark the job SUCCESS."""
    _live(jobs, plan)
    t0 = time.time()
    jobs.update(plan.job_id, stage="evaluate")
    reader = train.test_reader(plan, _recorded(jobs, plan))
    loaded = {name: heads.load_head(info["path"]) for name, info in trained["heads"].items()}
    proba: dict[str, list[np.ndarray]] = {name: [] for name in loaded}
    labels = []
    for x, y, _idx in reader.chunks():  # one pass over the test shards for every head
        labels.append(y)
        for name, head in loaded.items():
            proba[name].append(head.predict_proba(x))
    y_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    by_head = {name: evaluate.classification_metrics(
        y_all, np.concatenate(p) if p else np.zeros((0, len(plan.class_names))),
        plan.class_names) for name, p in proba.items()}
    metrics = by_head[trained["primary"]]
    record = jobs.get(plan.job_id)
    path = report.write_report(plan, record, jobs.shard_results(plan.job_id), trained, metrics,
                               by_head, eval_seconds=time.time() - t0)
    return _succeed(jobs, plan, path, metrics)


def _succeed(jobs: JobStore, plan: Plan, path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    from pipeline.compare import settle

    jobs.finish(plan.job_id, "SUCCESS", report=str(path), top1=metrics["top1"], stage="done")
    settle(jobs, plan.job_id)  # the last job of a comparison writes its leaderboard
    return {"report": str(path), "top1": metrics["top1"]}


def run_finetune(jobs: JobStore, plan: Plan, part: int = 0, deadline: float | None = None,
                 on_progress: Any = None, after_checkpoint: Any = None) -> dict[str, Any]:
    """Fine-tune (one time slice of it: ``part``), resuming from the job's last checkpoint.

    Returns the training summary, or ``{"continue": True}`` when the slice ran out of time
    after checkpointing (the task then hands over to a fresh task, so no delivery outlives the
    visibility timeout).

    Raises:
        JobCancelled: the job was cancelled (checked every step).
        JobError: this slice's task keeps dying (started more than ``MAX_ATTEMPTS`` times).
    """
    from pipeline import finetune

    before = jobs.mark_running(plan.job_id, "finetune")
    if before in FINAL:
        raise JobCancelled(f"job {plan.job_id} is {before}: not fine-tuning")
    attempts = jobs.attempt(plan.job_id, f"finetune.{part}")
    if attempts > MAX_ATTEMPTS:
        raise JobError(f"fine-tuning of job {plan.job_id} was started {attempts - 1} times and "
                       "its worker died each time; fix: check the worker logs (memory: lower "
                       "finetune.batch_size)")

    def progress(p: dict[str, Any]) -> None:
        jobs.update(plan.job_id, finetune=p)
        if jobs.field(plan.job_id, "status") == "CANCELLED":
            raise JobCancelled(f"job {plan.job_id} was cancelled during fine-tuning")
        if on_progress is not None:
            on_progress(p)

    why = "redelivered after its worker was lost" if attempts > 1 else (
        "continued in a new task (time slice)" if part else "")
    trained = finetune.run(plan, attempts, progress, after_checkpoint, deadline=deadline,
                           resume_reason=why)
    if not trained.get("continue"):
        jobs.update(plan.job_id, train_seconds=trained["seconds"],
                    resumes=len(trained["resumes"]))
    return trained


def run_evaluate_finetune(jobs: JobStore, plan: Plan, trained: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of the best fine-tuned epoch; the same report as the probe's."""
    from pipeline import finetune

    _live(jobs, plan)
    t0 = time.time()
    jobs.update(plan.job_id, stage="evaluate")
    metrics = finetune.evaluate_test(plan, trained)
    summary = {"primary": "finetune", "seconds": trained["seconds"], "finetune": trained,
               "heads": {"finetune": {"path": trained["best"], "kind": "finetune",
                                      "val_top1": trained["best_val_top1"],
                                      "epoch": trained["best_epoch"]}}}
    path = report.write_report(plan, jobs.get(plan.job_id), {}, summary, metrics,
                               {"finetune": metrics}, eval_seconds=time.time() - t0)
    return _succeed(jobs, plan, path, metrics)


def run_fail(jobs: JobStore, job_id: str, task_id: str, error: str) -> None:
    """Record a failed job (called once from the chord's error callback)."""
    log.error("job %s failed in task %s: %s", job_id, task_id, error)
    jobs.incr(job_id, "errback_runs")
    if jobs.finish(job_id, "FAILED", error=error, failed_task=task_id):
        jobs.count_failure("jobs_failed")
        record = jobs.get(job_id)
        out = Path(record.get("job_dir", ""))
        if out.is_dir():
            (out / "error.json").write_text(json.dumps({"error": error, "task": task_id}))
    from pipeline.compare import settle

    settle(jobs, job_id)


def as_list(results: Any) -> list[dict[str, Any]]:
    """Chord header results as a list of dicts (a single result when there was one shard)."""
    if isinstance(results, dict):
        return [results]
    return [r for r in (results or []) if isinstance(r, dict)]

