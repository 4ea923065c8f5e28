"""A comparison's leaderboard (JSON + HTML), made from its child jobs' reports.

Rows are sorted by validation accuracy; test accuracy is shown, never used to rank. Feature
dimension and parameter count come from the reports (the workers that ran the backbone
recorded them), so writing a leaderboard never builds a model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.backbones import is_baseline
from pipeline.fsio import atomic_write_text
from pipeline.reports.html import render_leaderboard

LEADERBOARD_SCHEMA = 1
COLUMNS = [("rank", "#"), ("backbone", "backbone"), ("weights", "weights"),
           ("strategy", "strategy"), ("val_top1", "val top-1"), ("test_top1", "test top-1"),
           ("test_top5", "test top-5"), ("balanced_accuracy", "balanced acc."),
           ("macro_f1", "macro F1"), ("extract_images_per_s", "extract img/s"),
           ("train_images_per_s", "train img/s"), ("train_s", "train s"),
           ("feature_dim", "feature dim"), ("parameters", "parameters"), ("status", "status")]


def row(job: dict[str, Any]) -> dict[str, Any]:
    """A child job's row from its record (``id``, ``status``, ``report`` ...)."""
    out: dict[str, Any] = {"job_id": job["id"], "status": job.get("status"),
                           "strategy": job.get("strategy"), "backbone": job.get("backbone")}
    if job.get("status") != "SUCCESS":
        return {**out, "error": job.get("error")}
    rep = json.loads(Path(job["report"]).read_text())
    m, t = rep["metrics"], rep["timings"]
    ft = rep["train"].get("finetune")
    if ft:
        val = ft["best_val_top1"]
        rates = [h["images_per_s"] for h in ft["history"] if h.get("images_per_s")]
        speed = {"train_images_per_s": round(sum(rates) / len(rates), 2) if rates else None}
        params = ft.get("params")
    else:
        sweep = rep.get("sweep")
        val = sweep["chosen_val_top1"] if sweep else rep["heads"][rep["primary_head"]].get(
            "val_top1")
        speed = {"extract_images_per_s": t.get("extract_images_per_s")}
        params = rep["backbone"].get("parameters")
    # a handcrafted baseline (mfcc...) answers "did transfer help?": marked, ranked like any row
    baseline = is_baseline(str(rep["backbone"]["weights_id"]))
    return {**out, "weights": rep["backbone"]["weights_id"], "baseline": baseline,
            "val_top1": val,
            "test_top1": m["top1"], "test_top5": m["top5"],
            "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
            **speed, "train_s": t.get("train_s"), "total_s": t.get("total_s"),
            "feature_dim": rep["backbone"].get("feature_dim"), "parameters": params,
            "image_size": rep["backbone"]["preprocessing"].get("crop"),
            "max_length": rep["backbone"]["preprocessing"].get("max_length"),
            "report": job["report"]}


def leaderboard(compare_id: str, children: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows sorted by validation top-1 (failed jobs last); test metrics shown alongside."""
    rows = [row(job) for job in children]
    rows.sort(key=lambda r: (r["status"] != "SUCCESS", -(r.get("val_top1") or 0.0),
                             -(r.get("test_top1") or 0.0)))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return {"schema": LEADERBOARD_SCHEMA, "compare_id": compare_id, "ranked_by": "val_top1",
            "rows": rows, "created": time.time()}


def write(board: dict[str, Any], folder: Path) -> Path:
    """``leaderboard.json`` and ``leaderboard.html`` in ``folder``, atomically."""
    atomic_write_text(folder / "leaderboard.json", json.dumps(board, indent=2), fsync=False)
    atomic_write_text(folder / "leaderboard.html", render_leaderboard(board, COLUMNS),
                      fsync=False)
    return folder / "leaderboard.json"
