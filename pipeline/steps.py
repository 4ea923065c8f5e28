"""What each Celery task does, as plain functions: the work plus the job-state bookkeeping.

Tasks in ``workers/tasks.py`` are decorator policy plus one call into a function here, so the
same steps run (and are tested) without Celery.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline import evaluate, extract, probe, report, store
from pipeline.errors import JobError
from pipeline.plan import Plan, Shard
from pipeline.state import JobStore

log = logging.getLogger(__name__)


def run_extract(jobs: JobStore, plan: Plan, shard: Shard,
                on_progress: Any = None) -> dict[str, Any]:
    """Extract one shard, counting progress in the job record."""
    jobs.mark_running(plan.job_id, "extract")
    reported = 0

    def progress(done: int, total: int) -> None:
        nonlocal reported
        jobs.incr(plan.job_id, "images_done", done - reported)
        reported = done
        if on_progress is not None:
            on_progress(done, total)

    result = extract.extract_shard(plan, shard, progress)
    jobs.record_shard(plan.job_id, result, shard.rows, reported)
    return result


def _checked_paths(plan: Plan, split: str, results: list[dict[str, Any]]) -> list[str]:
    """The split's shard paths, after checking each is a complete shard of this job's key."""
    done = {r["shard"] for r in results if isinstance(r, dict)}
    paths = []
    for s in plan.shards_of(split):
        if not (s.cached or s.id in done) or not store.valid_shard(s.path, plan.key, s.rows):
            raise JobError(f"shard {s.id} of job {plan.job_id} is missing or invalid at "
                           f"{s.path!r}; fix: rerun the job (valid shards are reused)")
        paths.append(s.path)
    return paths


def run_train(jobs: JobStore, plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit the linear probe on the training shards; save the head in the job folder."""
    t0 = time.time()
    jobs.update(plan.job_id, stage="train", extract_finished=t0)
    spec = plan.job_spec
    x, y, _skipped = store.load_split(_checked_paths(plan, "train", results))
    if len(y) == 0:
        raise JobError(f"job {plan.job_id}: no training features (every sample was skipped); "
                       "fix: check the data source")
    head = probe.fit_probe(x, y, len(plan.class_names), spec.probe.l2, spec.probe.max_iter)
    head.meta = {"backbone": spec.backbone.name, "weights": spec.backbone.weights,
                 "weights_id": plan.weights_id, "weights_sha256": plan.weights_sha256,
                 "preprocessing": plan.preprocessing, "class_names": plan.class_names,
                 "l2": spec.probe.l2, "feature_dim": int(x.shape[1]), "job_id": plan.job_id}
    model_path = plan.job_dir / "head.pt"
    head.save(model_path)
    train_acc = float((head.predict_proba(x).argmax(1) == y).mean())
    seconds = time.time() - t0
    jobs.update(plan.job_id, train_seconds=seconds)
    return {"model": str(model_path), "train_samples": len(y),
            "train_top1": train_acc, "seconds": round(seconds, 3), "shards": results}


def run_evaluate(jobs: JobStore, plan: Plan, trained: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the head once on the test shards; write report.json; mark the job SUCCESS."""
    t0 = time.time()
    jobs.update(plan.job_id, stage="evaluate")
    x, y, _skipped = store.load_split(_checked_paths(plan, "test", trained["shards"]))
    head = probe.LinearHead.load(trained["model"])
    metrics = evaluate.classification_metrics(y, head.predict_proba(x), plan.class_names)
    record = jobs.get(plan.job_id)
    path = report.write_report(plan, record, jobs.shard_results(plan.job_id), trained, metrics,
                               eval_seconds=time.time() - t0)
    jobs.finish(plan.job_id, "SUCCESS", report=str(path), top1=metrics["top1"], stage="done")
    return {"report": str(path), "top1": metrics["top1"]}


def run_fail(jobs: JobStore, job_id: str, task_id: str, error: str) -> None:
    """Record a failed job (called once from the chord's error callback)."""
    log.error("job %s failed in task %s: %s", job_id, task_id, error)
    if jobs.finish(job_id, "FAILED", error=error, failed_task=task_id):
        record = jobs.get(job_id)
        out = Path(record.get("job_dir", ""))
        if out.is_dir():
            (out / "error.json").write_text(json.dumps({"error": error, "task": task_id}))


def as_list(results: Any) -> list[dict[str, Any]]:
    """Chord header results as a list of dicts (a single result when there was one shard)."""
    if isinstance(results, dict):
        return [results]
    return [r for r in (results or []) if isinstance(r, dict)]

