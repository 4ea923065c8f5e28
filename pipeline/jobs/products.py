"""The steps that end a job with a product instead of a classifier: batch prediction
(``predictions.parquet``), embeddings with their index, and recommendation — each reads the
job's shards, calls its stage and writes the report; the job is marked SUCCESS.

Plain functions like :mod:`pipeline.jobs.steps` (whose helpers they share): the tasks in
``workers/tasks.py`` are one call into them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import JobError
from pipeline.heads import load_head
from pipeline.jobs.records import JobStore
from pipeline.jobs.steps import live, plan_source, shard_paths, shard_results
from pipeline.plan import Plan, PlanMessage, load_plan
from pipeline.reports import report
from pipeline.store.shards import ShardReader


def run_predict(jobs: JobStore, ref: PlanMessage) -> dict[str, Any]:
    """Batch prediction: the model's head over every extracted sample, shard by shard
    (bounded memory), into predictions.parquet + .csv; unreadable samples get a row with
    their error; the report sums it up; the job is marked SUCCESS.

    Raises:
        JobError: not a prediction job, or the head file changed since planning.
    """
    from pipeline.backbones import sha256_of
    from pipeline.predict import BatchWriter

    plan = load_plan(ref)
    pp = plan.predict
    if pp is None:
        raise JobError(f"job {plan.job_id} is not a prediction job (kind {plan.kind})")
    live(jobs, plan, "predict")
    t0 = time.time()
    if not Path(pp.head_path).is_file() or sha256_of(pp.head_path) != pp.head_sha256:
        raise JobError(f"job {plan.job_id}: the head {pp.head_path!r} is missing or changed "
                       f"since planning; fix: submit the prediction job again")
    head = load_head(pp.head_path)
    given = plan.class_names if len(plan.class_names) >= 2 else None  # the data's labels
    writer = BatchWriter(plan.job_dir, pp.class_names, pp.top, pp.low_confidence, given)
    try:
        for shard_path in shard_paths(jobs, plan):
            reader = ShardReader([shard_path])
            ids, at = reader.sample_ids(), 0
            for x, y, idx in reader.chunks(8192):
                writer.add(ids[at: at + len(idx)], idx, head.predict_proba(x),
                           y if given else None)
                at += len(idx)
            jobs.update(plan.job_id, predicted=writer.rows)
        results = shard_results(jobs, plan)
        writer.add_errors([sk for s in plan.shards if s.id in results
                           for sk in results[s.id].skipped])
        summary = writer.close()
    except BaseException:
        writer.abort()
        raise
    record = jobs.get(plan.job_id)
    rep = report.prediction_report(plan, record, report.shard_rows(plan, results), summary,
                                   time.time() - t0)
    path = _published(jobs, plan, rep, predicted=summary["predicted"],
                      predictions=summary["files"]["parquet"])
    return {"report": str(path), "predicted": summary["predicted"]}


def _started(jobs: JobStore, ref: PlanMessage, kind: str, stage: str) -> Plan:
    """The message's checked plan, which must be of ``kind``; the job marked live at
    ``stage``.

    Raises:
        JobError: a plan of another kind.
    """
    plan = load_plan(ref)
    if plan.kind != kind:
        raise JobError(f"job {plan.job_id} is not a {kind} job (kind {plan.kind})")
    live(jobs, plan, stage)
    return plan


def _published(jobs: JobStore, plan: Plan, rep: dict[str, Any], **fields: Any) -> Path:
    """Write the report and mark the job SUCCESS (with ``fields`` in its record)."""
    path = report.write_report(rep, plan.job_dir)
    jobs.finish(plan.job_id, "SUCCESS", report=str(path), stage="done", **fields)
    return path


def run_embed(jobs: JobStore, ref: PlanMessage) -> dict[str, Any]:
    """Embeddings: the job's shards into embeddings.parquet + index.faiss (``pipeline.embed``),
    a few example queries for the page, the report; the job is marked SUCCESS.

    Raises:
        JobError: not an embed job.
    """
    from pipeline import embed

    plan = _started(jobs, ref, "embed", "export")
    t0 = time.time()
    labeled = len(plan.class_names) >= 2
    done = embed.export(shard_paths(jobs, plan), plan.job_dir, plan.spec.embed,
                        plan.class_names, labeled, seed=plan.spec.data.seed)
    examples = report.embed_examples(plan, embed.Searcher(plan.job_dir), plan_source(plan))
    record = jobs.get(plan.job_id)
    rep = report.embed_report(plan, record, report.shard_rows(plan, shard_results(jobs, plan)),
                              done, examples, time.time() - t0)
    path = _published(jobs, plan, rep, embedded=done.count, index=done.index)
    return {"report": str(path), "embedded": done.count, "index": done.index}


def run_recommend_sweep(jobs: JobStore, ref: PlanMessage, index: int) -> dict[str, Any]:
    """One penalty of EASE's sweep (``recommend.cf_l2[index]``) scored on the validation part
    of training: the sweep fans out over the training workers, one task per penalty.

    Raises:
        JobError: not a recommend job, or no such penalty.
    """
    from pipeline import recommend

    plan = _started(jobs, ref, "recommend", "sweep")
    grid = plan.spec.recommend.cf_l2
    if not 0 <= index < len(grid):
        raise JobError(f"job {plan.job_id}: no recommendation penalty #{index}")
    data = recommend.load(plan.job_dir / "interactions.npz")
    return recommend.sweep_point(data, grid[index], tuple(plan.spec.recommend.ks),
                                 plan.spec.data.seed)


def run_recommend(jobs: JobStore, ref: PlanMessage,
                  sweep: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Recommendation: the items' features from the job's shards, the interactions split at
    planning, every model fitted and evaluated (``pipeline.recommend``; EASE's penalty from
    the ``sweep`` tasks' points), the report; the job is marked SUCCESS.

    Raises:
        JobError: not a recommend job.
    """
    from pipeline import recommend
    from pipeline.store.shards import ShardReader

    plan = _started(jobs, ref, "recommend", "train")
    t0 = time.time()
    x, _, idx = ShardReader(shard_paths(jobs, plan)).read()
    features = np.zeros((plan.n_samples, max(1, x.shape[1])), np.float32)
    has = np.zeros(plan.n_samples, bool)
    if len(idx):
        features[idx], has[idx] = x, True
    data = recommend.load(plan.job_dir / "interactions.npz")
    points = [p for p in (sweep or []) if isinstance(p, dict) and "l2" in p]
    result = recommend.run(data, features, has, plan.spec.recommend, plan.spec.data.seed,
                           points if len(points) == len(plan.spec.recommend.cf_l2) else None)
    result["recommendations"] = write_recommendations(plan.job_dir, data, result.pop("lists"),
                                                      result["best"])
    record = jobs.get(plan.job_id)
    rep = report.recommend_report(plan, record, report.shard_rows(plan, shard_results(jobs, plan)),
                                  result, time.time() - t0)
    path = _published(jobs, plan, rep)
    return {"report": str(path), "best": result["best"]}


def write_recommendations(job_dir: Path, data: dict[str, np.ndarray],
                          lists: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                          best: dict[str, str | None]) -> str:
    """``recommendations.parquet``: every user's top items by the best warm model (among warm
    items) and by the best cold model (among cold items): user, part, rank, item, score,
    model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.fsio import atomic_path

    cols: dict[str, list[Any]] = {k: [] for k in ("user", "part", "rank", "item", "score",
                                                  "model")}
    for part, (u, i, sc) in lists.items():
        rank = np.zeros(len(u), np.int32)
        if len(u):
            starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
            rank = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)])) + 1
        cols["user"] += data["user_names"][u].tolist()
        cols["part"] += [part] * len(u)
        cols["rank"] += rank.tolist()
        cols["item"] += data["item_names"][i].tolist()
        cols["score"] += sc.astype(float).tolist()
        cols["model"] += [best[part]] * len(u)
    path = job_dir / "recommendations.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)
    return str(path)
