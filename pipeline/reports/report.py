"""The job report: ``report.json`` (schema in ``docs/report.md``), ``report.html`` beside it,
and ``predictions.csv`` (one row per evaluated test sample)."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fsio import atomic_write_text
from pipeline.plan import Plan
from pipeline.reports.cells import csv_cell
from pipeline.reports.html import write_report_html
from pipeline.store.shards import ShardResult

REPORT_SCHEMA = 2


SHARD_FIELDS = ("rows", "sha256", "worker", "seconds", "images_per_s", "device", "threads",
                "model_seconds", "decode", "decoder", "truncated", "started_at", "finished_at",
                "skipped")


def shard_rows(plan: Plan, results: dict[str, ShardResult]) -> list[dict[str, Any]]:
    """One entry per planned shard: this job's task result, else what the cache recorded."""
    rows = []
    for s in plan.shards:
        r = results.get(s.id)
        got = r.model_dump(include=set(SHARD_FIELDS)) if r is not None else {
            k: [] if k == "skipped" else None for k in SHARD_FIELDS}
        rows.append({"id": s.id, "path": s.path, **got,
                     "cached": bool(s.cached or (r is not None and r.cached))})
    return rows


def data_section(plan: Plan, skipped: list[dict[str, str]],
                 used: dict[str, int] | None = None) -> dict[str, Any]:
    """What the report says about the data: sizes planned and used, what was left out."""
    sizes = plan.splits.sizes()
    used = used or {}
    return {"source": plan.spec.data.source, "class_names": plan.class_names,
            "samples": plan.n_samples, "split_sizes": sizes,
            "split_used": used or sizes,
            "split_skipped": {k: v - used.get(k, v) for k, v in sizes.items()},
            "fingerprint": plan.fingerprint, "fingerprint_mode": plan.fingerprint_mode,
            "skipped": skipped, "excluded": [e.model_dump() for e in plan.excluded],
            "warnings": list(plan.warnings)}


def timings(record: dict[str, Any], shards: list[dict[str, Any]],
            trained: dict[str, Any], eval_seconds: float, now: float) -> dict[str, Any]:
    created = float(record.get("created", now))
    started = float(record.get("started", created))
    extract_done = float(record.get("extract_finished", now))
    extracted = [s for s in shards if not s["cached"] and s.get("seconds") is not None]
    images = sum(s.get("rows") or 0 for s in extracted)
    shard_s = sum(s.get("seconds") or 0.0 for s in extracted)
    return {
        "queued_s": round(started - created, 3),
        "extract_s": round(extract_done - started, 3),
        "extract_task_s": round(shard_s, 3),
        "extract_model_s": round(sum(s.get("model_seconds") or 0.0 for s in extracted), 3),
        "extract_images": images,
        "extract_images_per_s": round(images / shard_s, 2) if shard_s else None,
        **({"quality_s": record.get("quality_s"),
            "quality_reused": bool(record.get("quality_reused"))}
           if record.get("quality_s") is not None else {}),
        "train_s": trained.get("seconds"),
        "evaluate_s": round(eval_seconds, 3),
        "total_s": round(now - created, 3),
    }


def build_report(plan: Plan, record: dict[str, Any], shards: list[dict[str, Any]],
                 trained: dict[str, Any], by_head: dict[str, dict[str, Any]],
                 eval_seconds: float, used: dict[str, int] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as a dict (see ``docs/report.md``)."""
    now = time.time()
    skipped = [sk for s in shards for sk in s["skipped"]] + list(
        (extra or {}).pop("skipped", []))
    primary = trained["primary"]
    rep: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "status": "SUCCESS",
        "job_id": plan.job_id,
        "name": plan.spec.name,
        "strategy": plan.strategy,
        "strategy_reason": plan.strategy_reason,
        "metrics": by_head[primary],
        "primary_head": primary,
        "heads": {name: {**trained["heads"][name], "metrics": m} for name, m in by_head.items()},
        "sweep": trained.get("sweep"),
        "train": {k: v for k, v in trained.items() if k not in ("heads", "sweep")},
        "data": {**data_section(plan, skipped, used),
                 # texts longer than the token limit (cut), counted by the extracting tasks
                 "truncated": sum(s.get("truncated") or 0 for s in shards)},
        "backbone": {"name": plan.backbone.name, "weights_id": plan.backbone.weights_id,
                     "weights_sha256": plan.backbone.weights_sha256,
                     "preprocessing": plan.backbone.preprocessing,
                     "feature_dim": trained.get("feature_dim"),
                     "parameters": trained.get("parameters")},
        "feature_store": {"key": plan.key, "dir": plan.shard_dir},
        "shards": shards,
        "timings": timings(record, shards, trained, eval_seconds, now),
        "spec": plan.spec.to_dict(),
        "created": float(record.get("created", now)),
        "finished": now,
        **(extra or {}),
    }
    return rep


def job_fields(plan: Plan, record: dict[str, Any], shards: list[dict[str, Any]],
               t: dict[str, Any], now: float) -> dict[str, Any]:
    """The backbone, store, shards, timings, spec and times every job's report carries."""
    return {"backbone": {"name": plan.backbone.name, "weights_id": plan.backbone.weights_id,
                         "weights_sha256": plan.backbone.weights_sha256,
                         "preprocessing": plan.backbone.preprocessing},
            "feature_store": {"key": plan.key, "dir": plan.shard_dir},
            "shards": shards, "timings": t, "spec": plan.spec.to_dict(),
            "created": float(record.get("created", now)), "finished": now}


def prediction_report(plan: Plan, record: dict[str, Any], shards: list[dict[str, Any]],
                      summary: dict[str, Any], predict_seconds: float) -> dict[str, Any]:
    """The report of a ``kind: predict`` job (see ``docs/report.md``)."""
    now = time.time()
    pp = plan.predict
    assert pp is not None  # a prediction job's plan has its model
    t = timings(record, shards, {}, 0.0, now)
    t.pop("train_s"), t.pop("evaluate_s")
    t["predict_s"] = round(predict_seconds, 3)
    done = summary["predicted"] + summary["failed"]
    t["samples_per_s"] = round(done / t["total_s"], 2) if t["total_s"] else None
    return {
        "schema": REPORT_SCHEMA, "status": "SUCCESS", "kind": "predict",
        "job_id": plan.job_id, "name": plan.spec.name,
        "model": {"job": pp.model_job, "head": pp.head, "head_path": pp.head_path,
                  "head_sha256": pp.head_sha256, "class_names": pp.class_names},
        "predictions": summary,
        "data": {"source": plan.spec.data.source, "path": plan.spec.data.path,
                 "samples": plan.n_samples, "fingerprint": plan.fingerprint},
        **job_fields(plan, record, shards, t, now),
    }


def embed_examples(plan: Plan, searcher: Any, source: Any, n: int = 4,
                   k: int = 6) -> list[dict[str, Any]]:
    """A few random samples' nearest neighbours (themselves first), with their thumbnails
    written beside the report (``embed_thumbnails.json``)."""
    from pipeline.reports.quality import thumbnails

    rng = np.random.default_rng(plan.spec.data.seed)
    picks = rng.permutation(len(searcher.ids))[:n]
    out = [{"query": searcher.ids[int(p)], "neighbours": searcher.by_id(searcher.ids[int(p)], k)}
           for p in picks]
    shown = sorted({int(nb["index"]) for ex in out for nb in ex["neighbours"]})
    atomic_write_text(plan.job_dir / "embed_thumbnails.json",
                      json.dumps(thumbnails(source, shown, side=96)), fsync=False)
    return out


def embed_report(plan: Plan, record: dict[str, Any], shards: list[dict[str, Any]],
                 done: Any, examples: list[dict[str, Any]],
                 export_seconds: float) -> dict[str, Any]:
    """The report of a ``kind: embed`` job (see ``docs/report.md``)."""
    now = time.time()
    t = timings(record, shards, {}, 0.0, now)
    t.pop("train_s"), t.pop("evaluate_s")
    t["export_s"] = round(export_seconds, 3)
    t["samples_per_s"] = round(done.count / t["total_s"], 2) if t["total_s"] else None
    skipped = [sk for s in shards for sk in s.get("skipped", [])]
    return {
        "schema": REPORT_SCHEMA, "status": "SUCCESS", "kind": "embed",
        "job_id": plan.job_id, "name": plan.spec.name,
        "embeddings": {"count": done.count, "dim": done.dim, "index": done.index,
                       "metric": "cosine", "recall_at_10": done.recall_at_10,
                       "seconds": round(done.seconds, 3), **done.details},
        "files": {"job_dir": str(plan.job_dir), "table": str(plan.job_dir / "embeddings.parquet"),
                  "index": str(plan.job_dir / "index.faiss")},
        "examples": examples, "thumbnails": str(plan.job_dir / "embed_thumbnails.json"),
        "data": {"source": plan.spec.data.source, "path": plan.spec.data.path,
                 "samples": plan.n_samples, "fingerprint": plan.fingerprint,
                 "skipped": skipped},
        **job_fields(plan, record, shards, t, now),
    }


def recommend_report(plan: Plan, record: dict[str, Any], shards: list[dict[str, Any]],
                     result: dict[str, Any], train_seconds: float) -> dict[str, Any]:
    """The report of a ``kind: recommend`` job (see ``docs/report.md``): the interactions and
    their split, every model's warm and cold metrics, the leaderboard."""
    now = time.time()
    t = timings(record, shards, {}, 0.0, now)
    t.pop("evaluate_s")
    t["train_s"] = round(train_seconds, 3)
    inter = json.loads((plan.job_dir / "interactions.json").read_text())
    k = result["k"]
    board = [{"part": part, "model": name, **m}
             for part in ("warm", "cold") for name, m in sorted(
                 result["results"][part].items(), key=lambda kv: -(kv[1][f"recall@{k}"] or 0))]
    skipped = [sk for s in shards for sk in s.get("skipped", [])]
    return {
        "schema": REPORT_SCHEMA, "status": "SUCCESS", "kind": "recommend",
        "job_id": plan.job_id, "name": plan.spec.name, "simulated": inter.get("simulated"),
        "interactions": inter, "recommend": result, "leaderboard": board,
        "files": {"job_dir": str(plan.job_dir),
                  "interactions": str(plan.job_dir / "interactions.npz"),
                  "recommendations": result.get("recommendations")},
        "data": {"source": plan.spec.data.source, "path": plan.spec.data.path,
                 "items": plan.n_samples, "fingerprint": plan.fingerprint,
                 "interactions": plan.spec.recommend.interactions, "skipped": skipped},
        **job_fields(plan, record, shards, t, now),
    }


def with_and_without(y: np.ndarray, proba: np.ndarray, idx: np.ndarray,
                     section: dict[str, Any], kept: np.ndarray) -> dict[str, Any]:
    """Test top-1 of the primary head on every test sample, without the leaked ones, and on
    what was evaluated (without what ``quality.exclude`` left out)."""
    def top1(mask: np.ndarray) -> float | None:
        return round(float((proba[mask].argmax(axis=1) == y[mask]).mean()), 5) \
            if mask.any() else None

    leaked = np.isin(idx, np.asarray(section.get("duplicates", {}).get("leaked", []),
                                     np.int64))
    return {"top1_all_test": top1(np.ones(len(y), bool)),
            "top1_without_leaks": top1(~leaked), "leaked_test_samples": int(leaked.sum()),
            "top1_evaluated": top1(kept), "excluded_test_samples": int((~kept).sum())}


def write_report(rep: dict[str, Any], job_dir: Path) -> Path:
    """Write ``report.json`` and ``report.html`` atomically; return the JSON's path."""
    path = job_dir / "report.json"
    atomic_write_text(path, json.dumps(rep, indent=2))
    write_report_html(rep, path.with_suffix(".html"))
    return path


def write_predictions(job_dir: Path, sample_ids: Sequence[str], indices: np.ndarray,
                      labels: np.ndarray, proba: np.ndarray, class_names: list[str],
                      name: str = "predictions.csv") -> Path:
    """One row per evaluated test sample: id, index, true label, predicted label, probability."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sample_id", "index", "label", "predicted", "probability"])
    pred = proba.argmax(axis=1) if len(proba) else np.zeros(0, np.int64)
    for sid, i, y, p, row in zip(sample_ids, indices, labels, pred, proba, strict=True):
        w.writerow([csv_cell(sid), int(i), csv_cell(class_names[int(y)]),
                    csv_cell(class_names[int(p)]), f"{float(row[int(p)]):.6f}"])
    return atomic_write_text(job_dir / name, buf.getvalue(), fsync=False)
