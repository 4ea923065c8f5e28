"""Compare backbones (and strategies) on one data set: a leaderboard in HTML + JSON.

``compare(spec, ["efficientnet_lite0", "resnet18:random"], ["probe", "finetune"])`` submits
one child job per (backbone, strategy). They are ordinary jobs: they fan out over the fleet in
parallel and reuse cached features. Each child, when it ends (success or failure), settles
once in the comparison's record in Redis; the one that settles last writes
``<output>/compare/<id>/leaderboard.json`` and ``leaderboard.html``, sorted by validation
accuracy (test accuracy is shown, never used to rank). No client has to stay connected.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import JobError, SpecError
from pipeline.jobs.broker import broker_url, connect
from pipeline.jobs.compare import SUBMITTED, write_for
from pipeline.jobs.records import JobStore
from pipeline.spec import STRATEGIES, JobSpec


def parse_backbone(entry: str) -> tuple[str, str | None]:
    """``name`` or ``name:weights`` (e.g. ``resnet18:random``, ``resnet50:IMAGENET1K_V2``), or
    ``job:<id>``: the encoder of a finished pretraining job (its own weights)."""
    entry = entry.strip()
    if entry.startswith("job:"):
        if len(entry) == 4:
            raise SpecError("compare.backbones", f"{entry!r} names no job",
                            "write job:<id> with the id featurefleet pretrain printed")
        return entry, None
    name, _, weights = entry.partition(":")
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
                return dict(json.loads(Path(rec["leaderboard"]).read_text()))
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
    from pipeline.client.api import submit
    from pipeline.planner import resolve_backbone

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
            label = name if weights is None else f"{name}:{weights}"
            children.append(spec.replace(
                name=f"{spec.name}:{label}:{strategy}", strategy=strategy,
                backbone={"name": name, "weights": weights}))
    for child in children:  # unknown names and unfinished jobs fail before any is enqueued
        resolve_backbone(child)
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
        write_for(store, compare_id)
    return Comparison(compare_id, broker)
