"""Compare backbones (and strategies) on one data set: a leaderboard in HTML + JSON.

``compare(spec, ["efficientnet_lite0", "resnet18:random"], ["probe", "finetune"])`` submits
one child job per (backbone, strategy). They are ordinary jobs: they fan out over the fleet in
parallel and reuse cached features. Each child, when it ends (success or failure), settles
once in the comparison's record in Redis; the one that settles last writes
``<output>/compare/<id>/leaderboard.json`` and ``leaderboard.html``, sorted by validation
accuracy (test accuracy is shown, never used to rank). No client has to stay connected.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import JobError, SpecError
from pipeline.spec import STRATEGIES, JobSpec
from pipeline.state import JobStore, broker_url, connect

log = logging.getLogger(__name__)
LEADERBOARD_SCHEMA = 1
SUBMITTED = "__submitted__"


def parse_backbone(entry: str) -> tuple[str, str | None]:
    """``name`` or ``name:weights`` (e.g. ``resnet18:random``, ``resnet50:IMAGENET1K_V2``)."""
    name, _, weights = entry.strip().partition(":")
    if not name:
        raise SpecError("compare.backbones", f"{entry!r} names no backbone",
                        "write name or name:weights, e.g. resnet18:random")
    return name, (weights or "DEFAULT")


class Comparison:
    """A handle on a comparison: its child jobs and, once all ended, the leaderboard."""

    def __init__(self, compare_id: str, broker: str | None = None) -> None:
        self.id = compare_id
        self.broker = broker_url(broker)
        self.jobs = JobStore(connect(self.broker))

    def status(self) -> dict[str, Any]:
        rec = self.jobs.comparison(self.id)
        if not rec:
            raise JobError(f"no comparison {self.id!r}; fix: check the id "
                           "(featurefleet compare prints it)")
        return rec

    def wait(self, timeout: float | None = None, poll: float = 1.0,
             on_progress: Any = None) -> dict[str, Any]:
        """Block until every child job ended; return the leaderboard."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rec = self.status()
            if on_progress is not None:
                on_progress(rec)
            if rec.get("leaderboard"):
                return json.loads(Path(rec["leaderboard"]).read_text())
            if rec.get("status") == "FAILED":
                raise JobError(f"comparison {self.id}: {rec.get('error')}; fix: read the child "
                               "jobs' reports (featurefleet report JOB_ID)")
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"comparison {self.id} not finished after {timeout:g} s; fix: "
                               "wait longer (featurefleet jobs shows its child jobs)")
            time.sleep(poll)


def compare(spec: JobSpec, backbones: list[str], strategies: list[str] | None = None,
            broker: str | None = None) -> Comparison:
    """Submit one job per (backbone, strategy); return the comparison's handle.

    Raises:
        SpecError: no backbones, an unknown strategy, or a child spec that does not validate
            (checked for every child before anything is enqueued).
    """
    from pipeline.api import submit

    strategies = strategies or ["probe"]
    if len(backbones) < 1:
        raise SpecError("compare.backbones", "is empty", "name at least one backbone")
    for s in strategies:
        if s not in STRATEGIES:
            raise SpecError("compare.strategies", f"unknown strategy {s!r}",
                            f"use some of {', '.join(STRATEGIES)}")
    compare_id = "cmp-" + uuid.uuid4().hex[:10]
    children = []
    for entry in backbones:
        name, weights = parse_backbone(entry)
        for strategy in strategies:
            child = dataclasses.replace(
                spec, name=f"{spec.name}:{name}:{weights}:{strategy}", strategy=strategy,
                backbone=dataclasses.replace(spec.backbone, name=name, weights=weights))
            children.append(child.validate())
    from pipeline.backbones import resolve_weights

    for child in children:  # unknown names fail here, before any child is enqueued
        resolve_weights(child.backbone.name, child.backbone.weights)
    out = Path(spec.output).expanduser().resolve() / "compare" / compare_id
    out.mkdir(parents=True, exist_ok=True)
    store = JobStore(connect(broker))
    # total counts the children plus this client's "all submitted" mark, so the leaderboard
    # is never written before the list of child jobs is complete.
    store.create_comparison(compare_id, {"dir": str(out), "name": spec.name,
                                         "total": len(children) + 1, "jobs": []})
    ids = []
    for child in children:
        ids.append(submit(child, broker=broker, compare_id=compare_id).id)
        store.update_comparison(compare_id, jobs=ids)
    if store.settle_comparison(compare_id, SUBMITTED):  # every child ended already
        _write_for(store, compare_id)
    return Comparison(compare_id, broker)


def settle(jobs: JobStore, job_id: str) -> str | None:
    """A child job ended: count it once; the last one writes the leaderboard (its path)."""
    compare_id = jobs.field(job_id, "compare_id")
    if not compare_id or not jobs.settle_comparison(compare_id, job_id):
        return None
    return _write_for(jobs, compare_id)


def _write_for(jobs: JobStore, compare_id: str) -> str | None:
    rec = jobs.comparison(compare_id)
    try:
        board = leaderboard(compare_id, [{"id": j, **jobs.get(j)} for j in rec["jobs"]])
        path = write(board, Path(rec["dir"]))
    except Exception as exc:  # the children's results stand; say why there is no board
        log.exception("comparison %s: no leaderboard", compare_id)
        jobs.update_comparison(compare_id, status="FAILED", finished=time.time(),
                               error=f"leaderboard not written: {type(exc).__name__}: {exc}")
        return None
    jobs.update_comparison(compare_id, leaderboard=str(path), status="SUCCESS",
                           finished=time.time())
    return str(path)


def _row(st: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"job_id": st["id"], "status": st.get("status"),
                           "strategy": st.get("strategy"), "backbone": st.get("backbone")}
    if st.get("status") != "SUCCESS":
        return {**row, "error": st.get("error")}
    rep = json.loads(Path(st["report"]).read_text())
    m, t = rep["metrics"], rep["timings"]
    ft = rep["train"].get("finetune")
    if ft:
        val = ft["best_val_top1"]
        rates = [h["images_per_s"] for h in ft["history"] if h.get("images_per_s")]
        speed = {"train_images_per_s": round(sum(rates) / len(rates), 2) if rates else None}
    else:
        sweep = rep.get("sweep")
        val = sweep["chosen_val_top1"] if sweep else None
        speed = {"extract_images_per_s": t.get("extract_images_per_s")}
    dim, params = _size(rep["backbone"]["name"])
    return {**row, "weights": rep["backbone"]["weights_id"], "val_top1": val,
            "test_top1": m["top1"], "test_top5": m["top5"],
            "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
            **speed, "train_s": t.get("train_s"), "total_s": t.get("total_s"),
            "feature_dim": dim, "parameters": params, "image_size":
            rep["backbone"]["preprocessing"]["crop"], "report": st["report"]}


@functools.lru_cache(maxsize=16)
def _size(name: str) -> tuple[int, int]:
    """Feature dimension and parameter count of an architecture (random init, on CPU; once
    per architecture, however many weights and strategies are compared)."""
    from pipeline.backbones import RANDOM, load_backbone

    bb = load_backbone(name, RANDOM, "cpu")
    return bb.feature_dim, sum(p.numel() for p in bb.model.parameters())


def leaderboard(compare_id: str, children: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows sorted by validation top-1 (failed jobs last); test metrics shown alongside."""
    rows = [_row(st) for st in children]
    rows.sort(key=lambda r: (r["status"] != "SUCCESS", -(r.get("val_top1") or 0.0),
                             -(r.get("test_top1") or 0.0)))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return {"schema": LEADERBOARD_SCHEMA, "compare_id": compare_id, "ranked_by": "val_top1",
            "rows": rows, "created": time.time()}


COLUMNS = [("rank", "#"), ("backbone", "backbone"), ("weights", "weights"),
           ("strategy", "strategy"), ("val_top1", "val top-1"), ("test_top1", "test top-1"),
           ("test_top5", "test top-5"), ("balanced_accuracy", "balanced acc."),
           ("macro_f1", "macro F1"), ("extract_images_per_s", "extract img/s"),
           ("train_images_per_s", "train img/s"), ("train_s", "train s"),
           ("feature_dim", "feature dim"), ("parameters", "parameters"), ("status", "status")]


def render(board: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v <= 1 else f"{v:.1f}"
        if isinstance(v, int) and v > 100_000:
            return f"{v / 1e6:.2f} M"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in COLUMNS)
                   + "</tr>" for r in board["rows"])
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>featurefleet "
            f"leaderboard {html.escape(board['compare_id'])}</title><style>body{{font-family:"
            "sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>Leaderboard <small>{html.escape(board['compare_id'])}</small></h1>"
            "<p>Sorted by validation top-1 (test accuracy is reported, never used to rank).</p>"
            f"<table id=\"leaderboard\"><tr>{head}</tr>{body}</table></body></html>")


def write(board: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("leaderboard.json", json.dumps(board, indent=2)),
                       ("leaderboard.html", render(board))):
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)
    return folder / "leaderboard.json"

