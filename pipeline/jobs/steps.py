"""What each Celery task does, as plain functions: load and check the plan the message refers
to, call one stage, keep the job's record in Redis.

Tasks in ``workers/tasks.py`` are decorator policy plus one call into a function here, so the
same steps run (and are tested) without Celery. Every function takes the message's plan
reference and ids, never paths: paths come from the checked plan.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import evaluate, extract, train
from pipeline.errors import JobCancelled, JobError, NotReady
from pipeline.fsio import atomic_write_text
from pipeline.heads import load_head
from pipeline.jobs.compare import settle
from pipeline.jobs.records import FINAL, JobStore
from pipeline.plan import Plan, check_job_id, check_paths, load_plan
from pipeline.reports import report
from pipeline.settings import get_settings
from pipeline.sources import checked_source
from pipeline.store import files, manifest, shards
from pipeline.store.shards import ShardReader

log = logging.getLogger(__name__)


def _live(jobs: JobStore, plan: Plan, stage: str) -> None:
    """The job is still running: mark the stage (a final job stops here)."""
    before = jobs.mark_running(plan.job_id, stage)
    if before in FINAL:
        raise JobCancelled(f"job {plan.job_id} is {before}: nothing more to do")


def _attempt(jobs: JobStore, plan: Plan, step: str, what: str) -> int:
    """Count a start of ``step``; one started more than the limit is a poison task (it keeps
    killing its worker: out of memory, a crashing decoder), so it fails instead of looping."""
    attempts = jobs.attempt(plan.job_id, step)
    limit = get_settings().max_attempts
    if attempts > limit:
        raise JobError(f"{what} of job {plan.job_id} was started {attempts - 1} times and its "
                       f"worker died each time (poison shard); fix: check the worker logs for "
                       "it (memory, data), or lower the batch size")
    return attempts


def run_extract(jobs: JobStore, ref: Any, shard_id: str,
                on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Extract one shard of the plan, counting progress in the job record.

    Raises:
        JobCancelled: the job was cancelled (checked before and between batches).
        JobError: the shard keeps killing its worker, or failed (the error names the shard).
    """
    plan = load_plan(ref)
    shard = plan.shard(shard_id)
    before = jobs.mark_running(plan.job_id, "extract")
    if before in FINAL:
        done = jobs.shard_results(plan.job_id).get(shard.id)
        if done is not None:  # delivered again after the job ended: nothing to change
            return {"shard": shard.id, "cached": True, "rows": done.get("rows"),
                    "sha256": done.get("sha256")}
        raise JobCancelled(f"job {plan.job_id} is {before}; shard {shard.id} not extracted")
    _attempt(jobs, plan, shard.id, f"shard {shard.id}")

    def progress(done: int, total: int) -> None:
        if jobs.shard_progress(plan.job_id, shard.id, done) == "CANCELLED":
            raise JobCancelled(f"job {plan.job_id} was cancelled during shard {shard.id}")
        if on_progress is not None:
            on_progress(done, total)

    try:
        result = _extract(plan, shard, progress)
    except JobCancelled:
        raise
    except Exception as exc:  # the job's error must name the shard
        raise JobError(f"shard {shard.id}: {exc}") from exc
    result = {"shard": shard.id, **result}
    jobs.record_shard(plan.job_id, result, shard.rows)
    return {k: result[k] for k in ("shard", "rows", "sha256", "cached")}


def _extract(plan: Plan, shard: Any, progress: Callable[[int, int], None]) -> dict[str, Any]:
    # A valid file written after planning is this task's own earlier delivery or a concurrent
    # job's identical shard: adopt it. One that existed at planning was judged untrusted.
    info = shards.inspect(shard.path, plan.key, shard.rows)
    if info is not None and files.mtime(shard.path) >= plan.created:
        return {"path": shard.path, "rows": info.rows, "skipped": info.skipped,
                "sha256": files.sha256_of(shard.path), "cached": True, "seconds": 0.0,
                "feature_dim": info.attrs.get("feature_dim"),
                "parameters": info.attrs.get("parameters")}
    source = _source(plan)
    target = extract.Target(path=shard.path, key=plan.key, not_before=plan.created,
                            attrs={"dataset_fingerprint": plan.fingerprint,
                                   "shard_start": shard.start, "shard_end": shard.end})
    return extract.extract_shard(source, plan.extract_ids[shard.start: shard.end],
                                 plan.backbone, plan.spec.backbone, target, progress)


def _source(plan: Plan) -> Any:
    """The plan's data, every decoded sample checked against its planned digest."""
    return checked_source(plan.spec.data, plan.n_samples, plan.class_names, plan.digests(),
                          plan.fingerprint_mode)


def shard_results(jobs: JobStore, plan: Plan) -> dict[str, dict[str, Any]]:
    """This job's shard results: recorded by its tasks, or (cached at planning) what the
    file and the manifest say."""
    recorded = jobs.shard_results(plan.job_id)
    known = None
    out = {}
    for s in plan.shards:
        if s.id in recorded:
            out[s.id] = recorded[s.id]
            continue
        info = shards.inspect(s.path, plan.key, s.rows)
        if info is None:
            continue
        known = known if known is not None else manifest.read_manifest(plan.shard_dir)
        entry = known["shards"].get(Path(s.path).name, {})
        out[s.id] = {"shard": s.id, "rows": info.rows, "skipped": info.skipped,
                     "sha256": entry.get("sha256"), "cached": True,
                     "feature_dim": info.attrs.get("feature_dim"),
                     "parameters": info.attrs.get("parameters")}
    return out


def _paths(jobs: JobStore, plan: Plan) -> list[str]:
    """Every shard's path, after checking each was extracted (or cached) and is valid."""
    recorded = set(jobs.shard_results(plan.job_id))
    for s in plan.shards:
        if not (s.cached or s.id in recorded) or shards.inspect(s.path, plan.key, s.rows) is None:
            raise JobError(f"shard {s.id} of job {plan.job_id} is missing or invalid at "
                           f"{s.path!r}; fix: retry the job (valid shards are reused)")
    return [s.path for s in plan.shards]


def run_collect(jobs: JobStore, ref: Any) -> dict[str, Any]:
    """After extraction: every shard is recorded (or was cached and is unchanged), the
    writer-computed checksums go into the cache manifest, and the skip bound holds."""
    plan = load_plan(ref)
    _live(jobs, plan, "train")
    jobs.incr(plan.job_id, "collect_runs")  # the chord callback must run once per job
    jobs.update(plan.job_id, extract_finished=time.time())
    _paths(jobs, plan)
    known = manifest.read_manifest(plan.shard_dir)
    for s in plan.shards:  # cached at planning: still the file the manifest vouches for?
        if s.cached and not manifest.trusted(s.path, plan.key, s.rows, known):
            raise JobError(f"cached shard {s.id} of job {plan.job_id} changed after planning "
                           f"({s.path!r} no longer has its recorded checksum); fix: retry the "
                           "job (the shard is extracted again)")
    results = shard_results(jobs, plan)
    fresh = {Path(s.path).name: {"sha256": results[s.id]["sha256"],
                                 "rows": results[s.id]["rows"],
                                 "skipped": len(results[s.id].get("skipped", []))}
             for s in plan.shards if not s.cached}
    manifest.record(plan.shard_dir, fresh, {
        "key": plan.key, "backbone": plan.backbone.name, "weights_id": plan.backbone.weights_id,
        "dataset_fingerprint": plan.fingerprint, "preprocessing": plan.backbone.preprocessing,
        "feature_dtype": plan.backbone.feature_dtype, "data": plan.spec.data.model_dump()})
    skipped = [sk for r in results.values() for sk in r.get("skipped", [])]
    total = sum(s.rows for s in plan.shards)
    bound = plan.spec.data.max_skipped_fraction
    if total and len(skipped) / total > bound:
        examples = "; ".join(f"{sk['id']}: {sk['reason']}" for sk in skipped[:5])
        raise JobError(f"{len(skipped)} of {total} samples could not be read "
                       f"({len(skipped) / total:.1%} > data.max_skipped_fraction {bound:g}), "
                       f"e.g. {examples}; fix: repair or remove those files, or raise "
                       "data.max_skipped_fraction")
    return {"shards": len(plan.shards), "skipped": len(skipped)}


def _features(jobs: JobStore, plan: Plan) -> dict[str, train.Features]:
    feats = train.read_splits(_paths(jobs, plan), {"train": plan.splits.train,
                                                   "val": plan.splits.val})
    train.require(feats, plan.job_id)
    return feats


def run_sweep(jobs: JobStore, ref: Any, index: int) -> dict[str, Any]:
    """One slice of the regularization sweep; its curve is recorded in the job record."""
    plan = load_plan(ref)
    if plan.sweep is None or not 0 <= int(index) < len(plan.sweep):
        raise JobError(f"job {plan.job_id} has no sweep slice {index!r}")
    _live(jobs, plan, "sweep")
    t0 = time.perf_counter()
    feats = _features(jobs, plan)
    curve = train.sweep_slice(feats["train"], feats["val"], len(plan.class_names),
                              plan.sweep[int(index)], plan.spec.probe.max_iter)
    jobs.record_slice(plan.job_id, int(index), {"slice": int(index), "curve": curve,
                                                "seconds": round(time.perf_counter() - t0, 3)})
    return {"slice": int(index)}


def run_train(jobs: JobStore, ref: Any) -> dict[str, Any]:
    """Select λ from the recorded sweep (or take the fixed one), fit every head, save them.

    Raises:
        NotReady: the chord body ran before every sweep slice was recorded (retried).
    """
    plan = load_plan(ref)
    _live(jobs, plan, "train")
    sweep = None
    if plan.sweep is not None:
        slices = jobs.slices(plan.job_id)
        if len(slices) < len(plan.sweep):
            raise NotReady(f"job {plan.job_id}: {len(slices)} of {len(plan.sweep)} sweep "
                           "slices recorded")
        l2, sweep = train.choose_l2(slices, len(plan.sweep))
    else:
        l2 = float(plan.l2 or 0.0)
    feats = _features(jobs, plan)
    results = shard_results(jobs, plan)
    params = next((r.get("parameters") for r in results.values() if r.get("parameters")), None)
    meta = {"backbone": plan.backbone.name, "weights": plan.backbone.weights,
            "weights_id": plan.backbone.weights_id,
            "weights_sha256": plan.backbone.weights_sha256,
            "preprocessing": plan.backbone.preprocessing, "class_names": plan.class_names,
            "job_id": plan.job_id}
    trained = train.fit_heads(feats["train"], feats["val"], len(plan.class_names),
                              plan.spec.probe, l2, meta, plan.job_dir, plan.spec.data.seed)
    atomic_write_text(plan.job_dir / "splits.json", json.dumps(
        {name: f.idx.tolist() for name, f in feats.items()}), fsync=False)
    trained.update(sweep=sweep, parameters=params)
    jobs.update(plan.job_id, train_seconds=trained["seconds"])
    return trained


def run_evaluate(jobs: JobStore, ref: Any, trained: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every head once on the test split; write the report; mark the job SUCCESS."""
    plan = load_plan(ref)
    _live(jobs, plan, "evaluate")
    t0 = time.time()
    reader = ShardReader(_paths(jobs, plan), np.asarray(plan.splits.test, np.int64))
    loaded = {name: load_head(info["path"]) for name, info in trained["heads"].items()}
    proba: dict[str, list[np.ndarray]] = {name: [] for name in loaded}
    labels, indices = [], []
    for x, y, idx in reader.chunks():  # one pass over the test rows for every head
        labels.append(y)
        indices.append(idx)
        for name, head in loaded.items():
            proba[name].append(head.predict_proba(x))
    y_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    idx_all = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    k = len(plan.class_names)
    by_head = {name: evaluate.classification_metrics(
        y_all, np.concatenate(p) if p else np.zeros((0, k)), plan.class_names)
        for name, p in proba.items()}
    primary = trained["primary"]
    ids = reader.sample_ids()
    report.write_predictions(plan.job_dir, ids, idx_all, y_all,
                             np.concatenate(proba[primary]) if proba[primary]
                             else np.zeros((0, k)), plan.class_names)
    rep = report.build_report(
        plan, jobs.get(plan.job_id), report.shard_rows(plan, shard_results(jobs, plan)),
        trained, by_head, time.time() - t0,
        used={"train": trained["train_samples"], "val": trained["val_samples"],
              "test": len(y_all)})
    return _succeed(jobs, plan, report.write_report(rep, plan.job_dir), by_head[primary])


def _succeed(jobs: JobStore, plan: Plan, path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    jobs.finish(plan.job_id, "SUCCESS", report=str(path), top1=metrics["top1"], stage="done")
    settle(jobs, plan.job_id)  # the last job of a comparison writes its leaderboard
    return {"report": str(path), "top1": metrics["top1"]}


def run_finetune(jobs: JobStore, ref: Any, part: int = 0, deadline: float | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune (one time slice of it: ``part``), resuming from the job's last checkpoint.

    Returns the training summary, or ``{"continue": True}`` when the slice ran out of time
    after checkpointing (the task then hands over to a fresh task, so no delivery outlives the
    visibility timeout).

    Raises:
        JobCancelled: the job was cancelled (checked every step).
        JobError: this slice's task keeps dying (started more than the attempt limit).
    """
    from pipeline import finetune

    plan = load_plan(ref)
    _live(jobs, plan, "finetune")
    attempts = _attempt(jobs, plan, f"finetune.{part}", "fine-tuning")

    def progress(p: dict[str, Any]) -> None:
        jobs.update(plan.job_id, finetune=p)
        if jobs.field(plan.job_id, "status") == "CANCELLED":
            raise JobCancelled(f"job {plan.job_id} was cancelled during fine-tuning")
        if on_progress is not None:
            on_progress(p)

    why = "redelivered after its worker was lost" if attempts > 1 else (
        "continued in a new task (time slice)" if part else "")
    source = _source(plan)
    trained = finetune.run(source, plan.splits, plan.class_names, plan.backbone,
                           plan.spec.finetune, seed=plan.spec.data.seed,
                           out_dir=plan.job_dir / "finetune", job_id=plan.job_id,
                           attempt=attempts, progress=progress, deadline=deadline,
                           resume_reason=why, splits_file=plan.job_dir / "splits.json")
    if not trained.get("continue"):
        jobs.update(plan.job_id, train_seconds=trained["seconds"],
                    resumes=len(trained["resumes"]))
    return trained


def run_evaluate_finetune(jobs: JobStore, ref: Any, trained: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of the best fine-tuned epoch; the same report as the probe's."""
    from pipeline import finetune

    plan = load_plan(ref)
    _live(jobs, plan, "evaluate")
    t0 = time.time()
    source = _source(plan)
    metrics, proba, ids = finetune.evaluate_test(source, plan.splits.test, plan.class_names,
                                                 trained["best"], plan.spec.finetune)
    skipped = metrics.pop("skipped_test")
    report.write_predictions(plan.job_dir, [source.sample_id(int(i)) for i in ids], ids,
                             source.labels[ids] if len(ids) else ids, proba, plan.class_names)
    summary = {"primary": "finetune", "seconds": trained["seconds"], "finetune": trained,
               "heads": {"finetune": {"path": trained["best"], "kind": "finetune",
                                      "val_top1": trained["best_val_top1"],
                                      "epoch": trained["best_epoch"]}},
               "parameters": trained.get("params")}
    rep = report.build_report(plan, jobs.get(plan.job_id), [], summary, {"finetune": metrics},
                              time.time() - t0, used={"train": trained["train_images"],
                                                      "val": trained["val_images"],
                                                      "test": len(ids)},
                              extra={"skipped": skipped})
    return _succeed(jobs, plan, report.write_report(rep, plan.job_dir), metrics)


def run_fail(jobs: JobStore, job_id: Any, task_id: str, error: str) -> None:
    """Record a failed job (called once from the canvas's error callback)."""
    job_id = check_job_id(job_id)
    log.error("job %s failed in task %s: %s", job_id, task_id, error)
    if not jobs.exists(job_id):
        log.error("job %s has no record (lost?): the failure is only logged", job_id)
        return
    jobs.incr(job_id, "errback_runs")
    if jobs.finish(job_id, "FAILED", error=error, failed_task=task_id):
        jobs.count_failure("jobs_failed")
        job_dir = Path(str(jobs.field(job_id, "job_dir") or ""))
        if job_dir.parts[-2:] == ("jobs", job_id) and job_dir.is_dir():
            check_paths([("output", str(job_dir))])
            atomic_write_text(job_dir / "error.json", json.dumps({"error": error,
                                                                  "task": task_id}))
    settle(jobs, job_id)
