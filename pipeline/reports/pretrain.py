"""The report of a pretraining job: ``report.json`` and ``report.html`` (loss and evaluation
curves, the autoencoder's reconstructions beside their inputs)."""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from typing import Any

from pipeline.fsio import atomic_write_text
from pipeline.plan import Plan
from pipeline.reports.plots import curve_svg
from pipeline.reports.templating import render

REPORT_SCHEMA = 1
METRICS = (("probe_top1", "linear probe"), ("knn_top1", "kNN"))


def did_it_help(train: dict[str, Any], n_test: int) -> dict[str, Any] | None:
    """Did pretraining help? The encoder's last online evaluation beside the same measurement
    (same labeled samples, same probe) for its initial weights and for the off-the-shelf
    backbone, per metric; a difference is called only when it exceeds twice the standard
    error of a difference of two accuracies on ``n_test`` samples (otherwise "no clear
    difference"). None without labeled evaluation samples."""
    evals = [h for h in train.get("history", []) if "probe_top1" in h]
    refs = [r for r in train.get("reference", []) if "probe_top1" in r]
    if not evals or not refs or n_test <= 0:
        return None
    final = evals[-1]
    rows: list[dict[str, Any]] = []
    for ref in refs:
        for key, label in METRICS:
            a, b = float(final[key]), float(ref[key])
            p = (a + b) / 2
            noise = 2 * math.sqrt(max(p * (1 - p), 1e-4) * 2 / n_test)
            delta = a - b
            call = ("ahead" if delta > noise else "behind" if delta < -noise
                    else "no clear difference")
            rows.append({"against": ref["encoder"], "role": ref["role"], "metric": label,
                         "pretrained": round(a, 4), "reference": round(b, 4),
                         "difference": round(delta, 4), "noise": round(noise, 4),
                         "call": call})
    main = next((r for r in rows if "off the shelf" in r["role"]
                 and r["metric"] == "linear probe"), rows[0])
    d = main["difference"]
    if main["call"] == "ahead":
        text = (f"yes: after {final['epoch']} epochs the encoder's linear probe reaches "
                f"{main['pretrained']:.3f} top-1, {d:+.3f} over {main['against']} "
                f"({main['reference']:.3f}); probe this encoder (backbone: job:<id>)")
    elif main["call"] == "behind":
        text = (f"no: after {final['epoch']} epochs the encoder's linear probe reaches "
                f"{main['pretrained']:.3f} top-1, {d:+.3f} behind {main['against']} "
                f"({main['reference']:.3f}); use that backbone, or pretrain longer / from "
                "its weights")
    else:
        text = (f"not measurably: after {final['epoch']} epochs the encoder's linear probe "
                f"reaches {main['pretrained']:.3f} top-1 against {main['reference']:.3f} for "
                f"{main['against']} (difference {d:+.3f}, within ±{main['noise']:.3f} on "
                f"{n_test} test samples)")
    start = next((r for r in rows if r["role"] == "initial" and r["metric"] == "linear probe"),
                 None)  # when the initial weights are not the off-the-shelf backbone
    if start is not None and start is not main:
        text += (f"; against its own initial weights ({start['reference']:.3f}): "
                 f"{start['difference']:+.3f}, " + {
                     "ahead": "ahead", "behind": "behind: pretraining made the features worse",
                     "no clear difference": "no clear difference"}[start["call"]])
    return {"answer": main["call"], "summary": text, "epoch": final["epoch"],
            "test_samples": n_test, "rows": rows}


def build(plan: Plan, record: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    created = float(record.get("created", now))
    s = plan.splits
    return {
        "schema": REPORT_SCHEMA, "kind": "pretrain", "status": "SUCCESS",
        "job_id": plan.job_id, "name": plan.spec.name, "method": plan.spec.pretrain.method,
        "recipe": plan.strategy_reason,
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
        "did_it_help": did_it_help(summary, len(s.test)),
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
        eval_svg=curve_svg({
            "kNN": [(h["epoch"], h["knn_top1"]) for h in evals],
            "linear probe": [(h["epoch"], h["probe_top1"]) for h in evals],
            **{f"{r['role']}: probe": [(evals[0]["epoch"], r["probe_top1"]),
                                       (evals[-1]["epoch"], r["probe_top1"])]
               for r in rep["train"].get("reference", []) if "probe_top1" in r}},
            "epoch", "top-1", "eval") if evals else "",
        helped=rep.get("did_it_help"),
        help_rows=[[r["metric"], r["against"], r["pretrained"], r["reference"],
                    f"{r['difference']:+.4f}", f"±{r['noise']:.4f}", r["call"]]
                   for r in (rep.get("did_it_help") or {}).get("rows", [])],
        unmeasured=[r for r in rep["train"].get("reference", []) if "note" in r],
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
