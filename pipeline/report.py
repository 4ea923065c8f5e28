"""The job report: ``report.json`` in the job folder, with metrics, shards, timings and spec."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline import store
from pipeline.plan import Plan

REPORT_SCHEMA = 1


def write_report(plan: Plan, record: dict[str, Any], shard_results: dict[str, dict[str, Any]],
                 trained: dict[str, Any], metrics: dict[str, Any],
                 by_head: dict[str, dict[str, Any]], eval_seconds: float) -> Path:
    """Assemble and atomically write ``report.json``; return its path.

    The schema is documented in ``docs/report.md``. Also writes ``report.html`` beside it.
    """
    now = time.time()
    created = float(record.get("created", now))
    started = float(record.get("started", created))
    extract_done = float(record.get("extract_finished", now))
    shards = []
    for s in plan.shards:
        r = shard_results.get(s.id) or {**store.shard_summary(s.path), "cached": True}
        shards.append({"id": s.id, "split": s.split, "path": s.path, "rows": r.get("rows"),
                       "sha256": r.get("sha256"), "worker": r.get("worker"),
                       "cached": bool(s.cached or r.get("cached")),
                       "seconds": r.get("seconds"), "images_per_s": r.get("images_per_s"),
                       "device": r.get("device"), "threads": r.get("threads"),
                       "started_at": r.get("started_at"), "finished_at": r.get("finished_at"),
                       "skipped": r.get("skipped", [])})
    extracted = [r for r in shard_results.values() if not r.get("cached")]
    images = sum(r.get("rows", 0) for r in extracted)
    model_s = sum(r.get("model_seconds", 0.0) for r in extracted)
    shard_s = sum(r.get("seconds", 0.0) for r in extracted)
    report = {
        "schema": REPORT_SCHEMA,
        "status": "SUCCESS",
        "job_id": plan.job_id,
        "name": plan.spec["name"],
        "strategy": plan.strategy,
        "strategy_reason": plan.strategy_reason,
        "metrics": metrics,
        "primary_head": trained["primary"],
        "heads": {name: {**trained["heads"][name], "metrics": m} for name, m in by_head.items()},
        "sweep": trained.get("sweep"),
        "train": {k: v for k, v in trained.items() if k not in ("heads", "sweep")},
        "data": {"source": plan.spec["data"]["source"], "class_names": plan.class_names,
                 "split_sizes": plan.split_sizes, "fingerprint": plan.fingerprint,
                 "skipped": [sk for s in shards for sk in s["skipped"]]},
        "backbone": {"name": plan.spec["backbone"]["name"], "weights_id": plan.weights_id,
                     "weights_sha256": plan.weights_sha256, "preprocessing": plan.preprocessing},
        "feature_store": {"key": plan.key, "dir": plan.shard_dir},
        "shards": shards,
        "timings": {
            "queued_s": round(started - created, 3),
            "extract_s": round(extract_done - started, 3),
            "extract_task_s": round(shard_s, 3),
            "extract_model_s": round(model_s, 3),
            "extract_images": images,
            "extract_images_per_s": round(images / shard_s, 2) if shard_s else None,
            "train_s": trained.get("seconds"),
            "evaluate_s": round(eval_seconds, 3),
            "total_s": round(now - created, 3),
        },
        "spec": plan.spec,
        "created": created,
        "finished": now,
    }
    path = plan.job_dir / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".report.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    from pipeline.html import write_html

    write_html(report, path.with_suffix(".html"))
    return path
