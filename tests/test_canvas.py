"""The canvas a plan becomes, checked directly (no broker, no worker): its shape, queues,
arguments, error callback and task ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import chain, chord, group
from celery.canvas import _chain

from pipeline.plan import Plan
from pipeline.planner import make_plan
from tests.conftest import small_spec
from workers.app import make_app
from workers.canvas import job_canvas, task_ids

JOB = "0123456789ab"


@pytest.fixture(scope="module")
def app() -> Any:
    a = make_app("redis://127.0.0.1:1/0")  # never connected: building signatures needs none
    yield a
    a.close()


def plan_for(tmp: Path, **changes: Any) -> tuple[Plan, Any]:
    plan = make_plan(small_spec(tmp).replace(**changes), JOB)
    return plan, plan.save()


def names(sigs: list[Any]) -> list[str]:
    return [s.task.removeprefix("featurefleet.") for s in sigs]


def in_order(canvas: Any) -> list[list[Any]]:
    """The canvas as the steps it runs, in order: each step a list of signatures run
    together (Celery folds ``chain(chord, ...)`` into a chord whose body carries the rest, so
    the nesting is not the thing to check; the order is)."""
    if isinstance(canvas, chord):
        return [list(canvas.tasks), *in_order(canvas.body)]
    if isinstance(canvas, _chain):  # what chain(...) builds
        return [step for t in canvas.tasks for step in in_order(t)]
    if isinstance(canvas, group):
        return [list(canvas.tasks)]
    return [[canvas]]


def errbacks(canvas: Any) -> set[str]:
    found = set()

    def walk(sig: Any) -> None:
        for cb in sig.options.get("link_error") or []:
            found.add(cb["task"] if isinstance(cb, dict) else cb.task)
        for t in getattr(sig, "tasks", []) or []:
            walk(t)
        if isinstance(sig, chord):
            walk(sig.body)

    walk(canvas)
    return found


def test_probe_canvas_shape(app: Any, tmp_path: Path) -> None:
    plan, ref = plan_for(tmp_path)
    canvas = job_canvas(app, plan, ref)
    extract, collect, sweep, train, evaluate = in_order(canvas)
    assert names(extract) == ["extract_shard"] * len(plan.shards) == ["extract_shard"] * 5
    for sig, shard in zip(extract, plan.shards, strict=True):
        assert sig.args == (ref.to_message(), shard.id)  # a reference and an id, no paths
        assert sig.options["queue"] == "ff.extract"
        assert sig.options["task_id"] == f"{JOB}.extract.{shard.id}"
    assert names(collect) == ["collect"] and collect[0].options["queue"] == "ff.train"
    assert names(sweep) == ["sweep_probe"] * 3  # probe.sweep_tasks
    assert [s.kwargs["index"] for s in sweep] == [0, 1, 2]
    assert names(train) == ["train_probe"] and names(evaluate) == ["evaluate"]
    assert evaluate[0].kwargs == {"ref": ref.to_message()}
    assert errbacks(canvas) == {"featurefleet.fail_job"}
    ids = task_ids(canvas)
    assert ids == sorted({f"{JOB}.extract.{s.id}" for s in plan.shards}
                         | {f"{JOB}.{t}" for t in ("collect", "train", "evaluate", "on-error",
                                                   "sweep.0", "sweep.1", "sweep.2")})


def test_fixed_l2_cached_shards_and_rounds(app: Any, tmp_path: Path) -> None:
    plan, ref = plan_for(tmp_path, probe={"l2": 0.01})
    cached = plan.model_copy(update={"shards": [s.model_copy(update={"cached": True})
                                                for s in plan.shards]})
    canvas = job_canvas(app, cached, ref, round_=2)
    collect, train, evaluate = in_order(canvas)  # nothing to extract, no sweep
    assert names(collect) == ["collect"] and collect[0].args == ([],)
    assert names(train + evaluate) == ["train_probe", "evaluate"]
    assert all(i.endswith(".r2") for i in task_ids(canvas))  # a re-dispatch has its own ids


def test_finetune_canvas(app: Any, tmp_path: Path) -> None:
    plan, ref = plan_for(tmp_path, strategy="finetune")
    assert plan.shards == []  # fine-tuning trains on the samples, not on cached features
    canvas = job_canvas(app, plan, ref)
    steps = [sig for step in in_order(canvas) for sig in step]
    assert names(steps) == ["finetune", "evaluate_finetune"]
    assert all(t.options["queue"] == "ff.extract" for t in steps)
    assert errbacks(canvas) == {"featurefleet.fail_job"}
    assert task_ids(canvas) == [f"{JOB}.evaluate", f"{JOB}.finetune", f"{JOB}.on-error"]


def test_task_ids_walk_nested_canvases(app: Any) -> None:
    def s(i: str) -> Any:
        return app.signature("x", task_id=i)

    nested = chain(chord(group([s("a"), s("b")]), s("c")), group([s("d"), chain(s("e"))]))
    assert task_ids(nested.on_error(s("err"))) == ["a", "b", "c", "d", "e", "err"]
