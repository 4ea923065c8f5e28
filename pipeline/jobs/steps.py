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
from pipeline.plan import Plan, PlanMessage, check_job_id, check_paths, load_plan
from pipeline.reports import report
from pipeline.settings import get_settings
from pipeline.sources import checked_source
from pipeline.store import files, manifest, shards
from pipeline.store.shards import ShardReader, ShardResult

log = logging.getLogger(__name__)


def live(jobs: JobStore, plan: Plan, stage: str) -> None:
    """The job is still running: mark the stage (a final job stops here)."""
    before = jobs.mark_running(plan.job_id, stage)
    if before in FINAL:
        raise JobCancelled(f"job {plan.job_id} is {before}: nothing more to do")


def count_attempt(jobs: JobStore, plan: Plan, step: str, what: str) -> int:
    """Count a start of ``step``; one started more than the limit is a poison task (it keeps
    killing its worker: out of memory, a crashing decoder), so it fails instead of looping."""
    return check_attempts(plan, jobs.attempt(plan.job_id, step), what)


def check_attempts(plan: Plan, attempts: int, what: str) -> int:
    limit = get_settings().max_attempts
    if attempts > limit:
        raise JobError(f"{what} of job {plan.job_id} was started {attempts - 1} times and its "
                       f"worker died each time (poison shard); fix: check the worker logs for "
                       "it (memory, data), or lower the batch size")
    return attempts


def run_extract(jobs: JobStore, ref: PlanMessage, shard_id: str,
                on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Extract one shard of the plan, counting progress in the job record.

    Raises:
        JobCancelled: the job was cancelled (checked before and between batches).
        JobError: the shard keeps killing its worker, or failed (the error names the shard).
    """
    plan = load_plan(ref)
    shard = plan.shard(shard_id)
    before, attempts = jobs.start(plan.job_id, "extract", shard.id)  # one round trip
    if before in FINAL:
        done = jobs.shard_results(plan.job_id).get(shard.id)
        if done is not None:  # delivered again after the job ended: nothing to change
            return {"shard": shard.id, "cached": True, "rows": done.get("rows"),
                    "sha256": done.get("sha256")}
        raise JobCancelled(f"job {plan.job_id} is {before}; shard {shard.id} not extracted")
    check_attempts(plan, attempts, f"shard {shard.id}")

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
    result = result.model_copy(update={"shard": shard.id})
    jobs.record_shard(plan.job_id, result, shard.rows)
    return {"shard": result.shard, "rows": result.rows, "sha256": result.sha256,
            "cached": result.cached}


def _extract(plan: Plan, shard: Any, progress: Callable[[int, int], None]) -> ShardResult:
    # A valid file written after planning is this task's own earlier delivery or a concurrent
    # job's identical shard: adopt it. One that existed at planning was judged untrusted.
    info = shards.inspect(shard.path, plan.key, shard.rows)
    if info is not None and files.mtime(shard.path) >= plan.created:
        return _cached_result(shard.id, shard.path, info, files.sha256_of(shard.path))
    source = plan_source(plan)
    target = extract.Target(path=shard.path, key=plan.key, not_before=plan.created,
                            attrs={"dataset_fingerprint": plan.fingerprint,
                                   "shard_start": shard.start, "shard_end": shard.end})
    return extract.extract_shard(source, plan.extract_ids[shard.start: shard.end],
                                 plan.backbone, plan.spec.backbone, target, progress)


def plan_source(plan: Plan) -> Any:
    """The plan's data, every decoded sample checked against its planned digest."""
    return checked_source(plan.spec.data, plan.n_samples, plan.class_names, plan.digests(),
                          plan.fingerprint_mode)


def _cached_result(shard_id: str, path: str, info: Any, sha256: str | None) -> ShardResult:
    """The result of a shard found valid in the store (nothing extracted)."""
    return ShardResult(shard=shard_id, path=path, rows=info.rows, skipped=info.skipped,
                       sha256=sha256, cached=True, seconds=0.0,
                       feature_dim=info.attrs.get("feature_dim"),
                       parameters=info.attrs.get("parameters"))


def shard_results(jobs: JobStore, plan: Plan) -> dict[str, ShardResult]:
    """This job's shard results: recorded by its tasks, or (cached at planning) what the
    file and the manifest say."""
    recorded = jobs.shard_results(plan.job_id)
    known = None
    out = {}
    for s in plan.shards:
        if s.id in recorded:
            out[s.id] = ShardResult.model_validate({"path": s.path, **recorded[s.id]})
            continue
        info = shards.inspect(s.path, plan.key, s.rows)
        if info is None:
            continue
        known = known if known is not None else manifest.read_manifest(plan.shard_dir)
        entry = known["shards"].get(Path(s.path).name, {})
        out[s.id] = _cached_result(s.id, s.path, info, entry.get("sha256"))
    return out


def shard_paths(jobs: JobStore, plan: Plan) -> list[str]:
    """Every shard's path, after checking each was extracted (or cached) and is valid."""
    recorded = set(jobs.shard_results(plan.job_id))
    for s in plan.shards:
        if not (s.cached or s.id in recorded) or shards.inspect(s.path, plan.key, s.rows) is None:
            raise JobError(f"shard {s.id} of job {plan.job_id} is missing or invalid at "
                           f"{s.path!r}; fix: retry the job (valid shards are reused)")
    return [s.path for s in plan.shards]


def run_collect(jobs: JobStore, ref: PlanMessage) -> dict[str, Any]:
    """After extraction: every shard is recorded (or was cached and is unchanged), the
    writer-computed checksums go into the cache manifest, and the skip bound holds."""
    plan = load_plan(ref)
    live(jobs, plan, "train")
    jobs.incr(plan.job_id, "collect_runs")  # the chord callback must run once per job
    jobs.update(plan.job_id, extract_finished=time.time())
    shard_paths(jobs, plan)
    known = manifest.read_manifest(plan.shard_dir)
    for s in plan.shards:  # cached at planning: still the file the manifest vouches for?
        if s.cached and not manifest.trusted(s.path, plan.key, s.rows, known):
            raise JobError(f"cached shard {s.id} of job {plan.job_id} changed after planning "
                           f"({s.path!r} no longer has its recorded checksum); fix: retry the "
                           "job (the shard is extracted again)")
    results = shard_results(jobs, plan)
    fresh = {Path(s.path).name: {"sha256": results[s.id].sha256, "rows": results[s.id].rows,
                                 "skipped": len(results[s.id].skipped)}
             for s in plan.shards if not s.cached}
    manifest.record(plan.shard_dir, fresh, {
        "key": plan.key, "backbone": plan.backbone.name, "weights_id": plan.backbone.weights_id,
        "dataset_fingerprint": plan.fingerprint, "preprocessing": plan.backbone.preprocessing,
        "feature_dtype": plan.backbone.feature_dtype, "data": plan.spec.data.model_dump()})
    skipped = [sk for r in results.values() for sk in r.skipped]
    total = sum(s.rows for s in plan.shards)
    bound = plan.spec.data.max_skipped_fraction
    if total and len(skipped) / total > bound:
        examples = "; ".join(f"{sk['id']}: {sk['reason']}" for sk in skipped[:5])
        raise JobError(f"{len(skipped)} of {total} samples could not be read "
                       f"({len(skipped) / total:.1%} > data.max_skipped_fraction {bound:g}), "
                       f"e.g. {examples}; fix: repair or remove those files, or raise "
                       "data.max_skipped_fraction")
    return {"shards": len(plan.shards), "skipped": len(skipped)}


def quality_excluded(plan: Plan) -> set[int]:
    """What ``quality.exclude`` leaves out of training and evaluation (empty when the stage
    did not run or excludes nothing), from the stage's ``quality.json``."""
    path = plan.job_dir / "quality.json"
    if plan.quality is None or not plan.spec.quality.exclude or not path.is_file():
        return set()
    section = json.loads(path.read_text())
    return {int(i) for ids in section.get("excluded", {}).values() for i in ids}


def _kept(ids: list[int], out: set[int]) -> list[int]:
    return [i for i in ids if i not in out] if out else ids


def _features(jobs: JobStore, plan: Plan) -> dict[str, train.Features]:
    out = quality_excluded(plan)
    feats = train.read_splits(shard_paths(jobs, plan), {
        "train": _kept(plan.splits.train, out), "val": _kept(plan.splits.val, out)})
    train.require(feats, plan.job_id)
    return feats


def run_sweep(jobs: JobStore, ref: PlanMessage, index: int) -> dict[str, Any]:
    """One slice of the regularization sweep; its curve is recorded in the job record."""
    plan = load_plan(ref)
    if plan.sweep is None or not 0 <= int(index) < len(plan.sweep):
        raise JobError(f"job {plan.job_id} has no sweep slice {index!r}")
    live(jobs, plan, "sweep")
    t0 = time.perf_counter()
    feats = _features(jobs, plan)
    curve = train.sweep_slice(feats["train"], feats["val"], len(plan.class_names),
                              plan.sweep[int(index)], plan.spec.probe.max_iter,
                              plan.spec.data.seed)
    jobs.record_slice(plan.job_id, int(index), {"slice": int(index), "curve": curve,
                                                "seconds": round(time.perf_counter() - t0, 3)})
    return {"slice": int(index)}


def run_train(jobs: JobStore, ref: PlanMessage) -> dict[str, Any]:
    """Select λ from the recorded sweep (or take the fixed one), fit every head, save them.

    Raises:
        NotReady: the chord body ran before every sweep slice was recorded (retried).
    """
    plan = load_plan(ref)
    live(jobs, plan, "train")
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
    params = next((r.parameters for r in results.values() if r.parameters), None)
    meta = {"backbone": plan.backbone.name, "weights": plan.backbone.weights,
            "weights_id": plan.backbone.weights_id,
            "weights_sha256": plan.backbone.weights_sha256,
            "preprocessing": plan.backbone.preprocessing, "class_names": plan.class_names,
            "decode": plan.spec.backbone.decode, "job_id": plan.job_id}
    trained = train.fit_heads(feats["train"], feats["val"], len(plan.class_names),
                              plan.spec.probe, l2, meta, plan.job_dir, plan.spec.data.seed)
    atomic_write_text(plan.job_dir / "splits.json", json.dumps(
        {name: f.idx.tolist() for name, f in feats.items()}), fsync=False)
    trained.update(sweep=sweep, parameters=params)
    jobs.update(plan.job_id, train_seconds=trained["seconds"])
    return trained


def run_evaluate(jobs: JobStore, ref: PlanMessage, trained: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every head once on the test split; write the report; mark the job SUCCESS."""
    plan = load_plan(ref)
    live(jobs, plan, "evaluate")
    t0 = time.time()
    reader = ShardReader(shard_paths(jobs, plan), np.asarray(plan.splits.test, np.int64))
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
    p_all = {name: np.concatenate(p) if p else np.zeros((0, k)) for name, p in proba.items()}
    keep = ~np.isin(idx_all, np.asarray(sorted(quality_excluded(plan)), np.int64))
    by_head = {name: evaluate.classification_metrics(y_all[keep], p[keep], plan.class_names)
               for name, p in p_all.items()}
    primary = trained["primary"]
    ids = [sid for sid, kept in zip(reader.sample_ids(), keep, strict=True) if kept]
    report.write_predictions(plan.job_dir, ids, idx_all[keep], y_all[keep],
                             p_all[primary][keep], plan.class_names)
    extra = {}
    if plan.quality is not None and (plan.job_dir / "quality.json").is_file():
        section = json.loads((plan.job_dir / "quality.json").read_text())
        section["evaluation"] = report.with_and_without(
            y_all, p_all[primary], idx_all, section, keep)
        extra["quality"] = section
    rep = report.build_report(
        plan, jobs.get(plan.job_id), report.shard_rows(plan, shard_results(jobs, plan)),
        trained, by_head, time.time() - t0,
        used={"train": trained["train_samples"], "val": trained["val_samples"],
              "test": int(keep.sum())}, extra=extra)
    return succeed(jobs, plan, report.write_report(rep, plan.job_dir), by_head[primary])


def succeed(jobs: JobStore, plan: Plan, path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    jobs.finish(plan.job_id, "SUCCESS", report=str(path), top1=metrics["top1"], stage="done")
    settle(jobs, plan.job_id)  # the last job of a comparison writes its leaderboard
    return {"report": str(path), "top1": metrics["top1"]}


def run_evaluate_finetune(jobs: JobStore, ref: PlanMessage,
                          trained: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of the best fine-tuned epoch; the same report as the probe's."""
    from pipeline import finetune

    plan = load_plan(ref)
    live(jobs, plan, "evaluate")
    t0 = time.time()
    source = plan_source(plan)
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
    return succeed(jobs, plan, report.write_report(rep, plan.job_dir), metrics)


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
