"""The one place that builds Celery canvases from plans.

A probe job is::

    chord(extract_shard per uncached shard) -> collect
      -> chord(quality_part per part) -> quality_finish
      -> chord(sweep_probe per grid slice) -> train_probe -> evaluate

(with a fixed L2 penalty the sweep chord is skipped; with ``quality.enabled: false`` the
quality chord; a ``kind: quality`` job ends with ``quality_finish``, which writes its report; a
``kind: predict`` job is ``chord(extract_shard ...) -> collect -> predict``). An
error callback marks the job FAILED. No task waits on another. Training runs (fine-tuning,
pretraining) are ``chord(train_node per node, on the GPU queue) -> train_done``, followed by
``evaluate_finetune`` or ``finish_pretrain``; after each time slice ``train_done`` replaces
itself with the next slice's chord (the rest of the chain and the error callback follow).

Messages carry the plan's reference (job id, path, sha256) and ids, never the plan or paths.
The ids of a job's tasks are read off the canvas itself (:func:`task_ids`), so cancel revokes
exactly what was sent, re-dispatched rounds included.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import _chain  # what chain(...) builds (chain itself is a subclass)

from pipeline.plan import Plan, PlanRef
from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE


def job_canvas(app: Celery, plan: Plan, ref: PlanRef, round_: int = 0) -> Any:
    """The signature that runs a whole job (``round_`` > 0: re-dispatched by the watchdog;
    shards finished in an earlier round are reused by their tasks, not extracted again)."""
    msg = ref.to_message()

    def sig(name: str, *args: Any, tid: str, queue: str = TRAIN_QUEUE, **kw: Any) -> Any:
        return signature(app, plan.job_id, name, *args, tid=tid, queue=queue, round_=round_,
                         **kw)

    on_error = sig("fail_job", plan.job_id, tid="on-error")
    if plan.program == "pretrain":
        return chain(training(app, plan, ref, 0, round_),
                     sig("finish_pretrain", ref=msg, tid="finish")).on_error(on_error)
    if plan.program == "finetune":  # trains on the samples, on the GPU queue
        return chain(training(app, plan, ref, 0, round_),
                     sig("evaluate_finetune", ref=msg, tid="evaluate",
                         queue=EXTRACT_QUEUE)).on_error(on_error)
    header = [sig("extract_shard", msg, s.id, tid=f"extract.{s.id}", queue=EXTRACT_QUEUE)
              for s in plan.shards if not s.cached]
    steps: list[Any] = [chord(group(header), sig("collect", ref=msg, tid="collect"))
                        if header else sig("collect", [], ref=msg, tid="collect")]
    if plan.quality is not None:  # before training: quality.exclude may leave samples out
        # the probe part (the backbone on copies) runs on the GPU queue beside the others;
        # sent with the extraction instead, it lengthened the job: extraction keeps every
        # core busy, the parts after it do not (benchmarks/quality_cost.py)
        parts = [sig("quality_part", ref=msg, part=p, tid=f"quality.{p}",
                     queue=EXTRACT_QUEUE if p == "probe" else TRAIN_QUEUE)
                 for p in plan.quality.parts()]
        finish = sig("quality_finish", ref=msg, tid="quality.finish")
        # a result for the same features, split and settings is in the store: reused
        steps.append(chord(group(parts), finish) if parts else finish)
    if plan.kind == "quality":
        return chain(*steps).on_error(on_error)
    if plan.kind == "embed":  # the features exported with a nearest-neighbour index
        steps.append(sig("embed_export", ref=msg, tid="export"))
        return chain(*steps).on_error(on_error)
    if plan.kind == "recommend":  # models on the interactions and the items' features
        sweeps = [sig("recommend_sweep", ref=msg, index=i, tid=f"sweep.{i}")
                  for i in range(len(plan.spec.recommend.cf_l2))]
        steps.append(chord(group(sweeps), sig("recommend_train", ref=msg, tid="train")))
        return chain(*steps).on_error(on_error)
    if plan.kind == "predict":  # the trained head over every sample's features
        steps.append(sig("predict", ref=msg, tid="predict"))
        return chain(*steps).on_error(on_error)
    train = sig("train_probe", ref=msg, tid="train")
    if plan.sweep is not None:
        sweeps = [sig("sweep_probe", ref=msg, index=i, tid=f"sweep.{i}")
                  for i in range(len(plan.sweep))]
        steps.append(chord(group(sweeps), train))
    else:
        steps.append(train)
    steps.append(sig("evaluate", ref=msg, tid="evaluate"))
    return chain(*steps).on_error(on_error)


def training(app: Celery, plan: Plan, ref: PlanRef, part: int, round_: int = 0) -> Any:
    """One time slice of the job's training run (``plan.program``): a task per node (GPU
    queue), then ``train_done``."""
    msg = ref.to_message()
    program, nodes = plan.program, plan.training.nodes
    header = [signature(app, plan.job_id, "train_node", msg, program, part, slot, round_,
                        tid=f"{program}.p{part}.n{slot}", queue=EXTRACT_QUEUE, round_=round_)
              for slot in range(nodes)]
    body = signature(app, plan.job_id, "train_done", ref=msg, program=program, part=part,
                     round_no=round_, tid=f"{program}.done.p{part}", round_=round_)
    return chord(group(header), body)


def signature(app: Celery, job_id: str, name: str, *args: Any, tid: str,
              queue: str = TRAIN_QUEUE, round_: int = 0, **kw: Any) -> Any:
    """One task of a job. Task ids name the job and the step: cancel can revoke them, Flower
    shows them. The arguments are shown as that name too (a short, fixed-size text)."""
    task_id = f"{job_id}.{tid}" + (f".r{round_}" if round_ else "")
    return app.signature(f"featurefleet.{name}", args=args, kwargs=kw, queue=queue,
                         task_id=task_id, argsrepr=f"({task_id!r})",
                         kwargsrepr="{" + ", ".join(sorted(kw)) + "}")


def task_ids(canvas: Any) -> list[str]:
    """Every task id in a canvas: its tasks, chord bodies and error callbacks."""
    found: list[str] = []

    def walk(sig: Any) -> None:
        if sig is None:
            return
        if isinstance(sig, chord):
            for t in sig.tasks:
                walk(t)
            walk(sig.body)
        elif isinstance(sig, (_chain, group)):
            for t in sig.tasks:
                walk(t)
        elif sig.options.get("task_id"):
            found.append(sig.options["task_id"])
        for cb in sig.options.get("link_error") or []:
            walk(cb)

    walk(canvas)
    return sorted(set(found))


def send(app: Celery, canvas: Any) -> None:
    """Enqueue a canvas. The client never waits on Celery results (job state lives in
    Redis), so the result subscriptions are dropped at once: collected later they would talk
    to a broker that may be gone."""
    canvas.apply_async()
    consumer = app.backend.result_consumer
    consumer.subscribed_to.clear()
    consumer.stop()
