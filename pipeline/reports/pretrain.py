"""The report of a pretraining job: ``report.json`` and ``report.html`` (loss and evaluation
curves, the autoencoder's reconstructions beside their inputs)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from pipeline.fsio import atomic_write_text
from pipeline.plan import Plan
from pipeline.reports.plots import curve_svg
from pipeline.reports.templating import render

REPORT_SCHEMA = 1


def build(plan: Plan, record: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    created = float(record.get("created", now))
    s = plan.splits
    return {
        "schema": REPORT_SCHEMA, "kind": "pretrain", "status": "SUCCESS",
        "job_id": plan.job_id, "name": plan.spec.name, "method": plan.spec.pretrain.method,
        "backbone_name": f"job:{plan.job_id}",
        "encoder": summary.get("encoder"), "encoder_sha256": summary.get("encoder_sha256"),
        "reconstructions": summary.get("reconstructions"),
        "backbone": {"arch": plan.backbone.name, "init": plan.backbone.weights_id,
                     "preprocessing": plan.backbone.preprocessing,
                     "feature_dim": summary.get("feature_dim")},
        "data": {"source": plan.spec.data.source, "samples": plan.n_samples,
                 "samples_used": len(s.train) + len(s.val), "eval_train": len(s.train),
                 "eval_test": len(s.test), "class_names": plan.class_names,
                 "excluded": [e.model_dump() for e in plan.excluded],
                 "fingerprint": plan.fingerprint},
        "train": {k: v for k, v in summary.items()
                  if k not in ("encoder", "encoder_sha256", "reconstructions")},
        "timings": {"queued_s": round(float(record.get("started", created)) - created, 3),
                    "train_s": summary.get("seconds"), "total_s": round(now - created, 3)},
        "spec": plan.spec.to_dict(), "created": created, "finished": now,
    }


def render_html(rep: dict[str, Any]) -> str:
    history = rep["train"].get("history", [])
    evals = [h for h in history if "knn_top1" in h]
    recon, width = "", 0
    path = rep.get("reconstructions")
    if path and Path(path).is_file():
        recon = base64.b64encode(Path(path).read_bytes()).decode()
        width = 8 * 64
    return render(
        "pretrain.html.j2", rep=rep,
        finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["finished"])),
        loss_svg=curve_svg({"loss": [(h["epoch"], h["loss"]) for h in history]}, "epoch",
                           "loss", "loss"),
        eval_svg=curve_svg({"kNN": [(h["epoch"], h["knn_top1"]) for h in evals],
                            "linear probe": [(h["epoch"], h["probe_top1"]) for h in evals]},
                           "epoch", "top-1", "eval") if evals else "",
        evals=evals, recon=recon, recon_width=width,
        epochs=[[h["epoch"], h["loss"], h.get("knn_top1", ""), h.get("probe_top1", ""),
                 h.get("images_per_s", "")] for h in history],
        resumes=[[r["reason"], r["epoch"] + 1, r["step"], r["attempt"], r.get("restart", 0)]
                 for r in rep["train"].get("resumes", [])],
        times=[[k, v] for k, v in rep["timings"].items()])


def write(rep: dict[str, Any], job_dir: Path) -> Path:
    path = job_dir / "report.json"
    atomic_write_text(path, json.dumps(rep, indent=2))
    atomic_write_text(path.with_suffix(".html"), render_html(rep), fsync=False)
    return path
