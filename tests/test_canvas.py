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
    plan, ref = plan_for(tmp_path, quality={"enabled": True})
    canvas = job_canvas(app, plan, ref)
    extract, collect, quality, finish, sweep, train, evaluate = in_order(canvas)
    assert names(extract) == ["extract_shard"] * len(plan.shards) == ["extract_shard"] * 5
    for sig, shard in zip(extract, plan.shards, strict=True):
        assert sig.args == (ref.to_message(), shard.id)  # a reference and an id, no paths
        assert sig.options["queue"] == "ff.extract"
        assert sig.options["task_id"] == f"{JOB}.extract.{shard.id}"
    assert names(collect) == ["collect"] and collect[0].options["queue"] == "ff.train"
    # the quality stage is on by default: its parts fan out before training; only the probe
    # part (it runs the backbone) goes to the GPU queue
    assert plan.quality is not None
    parts = plan.quality.parts()
    assert [s.kwargs["part"] for s in quality] == parts
    assert {s.kwargs["part"]: s.options["queue"] for s in quality} == {
        p: "ff.extract" if p == "probe" else "ff.train" for p in parts}
    assert names(finish) == ["quality_finish"]
    assert names(sweep) == ["sweep_probe"] * 3  # probe.sweep_tasks
    assert [s.kwargs["index"] for s in sweep] == [0, 1, 2]
    assert names(train) == ["train_probe"] and names(evaluate) == ["evaluate"]
    assert evaluate[0].kwargs == {"ref": ref.to_message()}
    assert errbacks(canvas) == {"featurefleet.fail_job"}
    ids = task_ids(canvas)
    assert ids == sorted({f"{JOB}.extract.{s.id}" for s in plan.shards}
                         | {f"{JOB}.{t}" for t in ("collect", "train", "evaluate", "on-error",
                                                   "sweep.0", "sweep.1", "sweep.2",
                                                   "quality.finish")}
                         | {f"{JOB}.quality.{p}" for p in parts})


def test_quality_kind_ends_with_its_report(app: Any, tmp_path: Path) -> None:
    plan, ref = plan_for(tmp_path, kind="quality", quality={"enabled": True})
    steps = in_order(job_canvas(app, plan, ref))
    assert [names(s)[0] for s in steps] == ["extract_shard", "collect", "quality_part",
                                            "quality_finish"]


def test_quality_disabled_skips_its_chord(app: Any, tmp_path: Path) -> None:
    plan, ref = plan_for(tmp_path, quality={"enabled": False})
    assert plan.quality is None  # (small_spec's default; a user's probe job has it on)
    steps = in_order(job_canvas(app, plan, ref))
    assert "quality_part" not in {n for s in steps for n in names(s)}


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
    nodes, done, evaluate = in_order(canvas)
    assert names(nodes) == ["train_node"] and nodes[0].options["queue"] == "ff.extract"
    assert names(done) == ["train_done"] and names(evaluate) == ["evaluate_finetune"]
    assert evaluate[0].options["queue"] == "ff.extract"
    assert errbacks(canvas) == {"featurefleet.fail_job"}
    assert task_ids(canvas) == [f"{JOB}.evaluate", f"{JOB}.finetune.done.p0",
                                f"{JOB}.finetune.p0.n0", f"{JOB}.on-error"]


def test_pretrain_canvas_one_task_per_node(app: Any, tmp_path: Path) -> None:
    plan, ref = plan_for(tmp_path, kind="pretrain", pretrain={"nodes": 2, "batch_size": 8})
    nodes, done, finish = in_order(job_canvas(app, plan, ref))
    assert names(nodes) == ["train_node", "train_node"]
    assert [n.args[-2] for n in nodes] == [0, 1]  # slot
    assert all(n.options["queue"] == "ff.extract" for n in nodes)
    assert names(done) == ["train_done"] and names(finish) == ["finish_pretrain"]


def test_task_ids_walk_nested_canvases(app: Any) -> None:
    def s(i: str) -> Any:
        return app.signature("x", task_id=i)

    nested = chain(chord(group([s("a"), s("b")]), s("c")), group([s("d"), chain(s("e"))]))
    assert task_ids(nested.on_error(s("err"))) == ["a", "b", "c", "d", "e", "err"]
