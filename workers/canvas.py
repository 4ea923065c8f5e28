"""The one place that builds Celery canvases from plans.

A probe job is::

    chord(extract_shard per uncached shard) -> collect
      -> chord(sweep_probe per grid slice) -> train_probe -> evaluate

(with a fixed L2 penalty the sweep chord is skipped: collect -> train_probe -> evaluate). An
error callback marks the job FAILED. No task waits on another. A fine-tuning job is
``finetune -> evaluate_finetune``, both on the GPU queue (the fine-tune task replaces itself
with a continuation after each time slice, keeping the chain and the error callback).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, chord, group

from pipeline.plan import Plan
from pipeline.train import grid_slices
from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE


def job_canvas(app: Celery, plan: Plan, round_: int = 0) -> Any:
    """The signature that runs a whole job (``round_`` > 0: re-dispatched by the watchdog;
    shards finished in an earlier round are reused by their tasks, not extracted again)."""
    full = plan.to_dict()
    light = {**full, "shards": []}  # tasks that need the recipe, not the shard list

    def sig(name: str, *args: Any, tid: str, queue: str = TRAIN_QUEUE, **kw: Any) -> Any:
        return signature(app, plan.job_id, name, *args, tid=tid, queue=queue, round_=round_,
                         **kw)

    on_error = sig("fail_job", plan.job_id, tid="on-error")
    if plan.strategy == "finetune":  # trains on the images: one task on the GPU queue
        return chain(sig("finetune", full, tid="finetune", queue=EXTRACT_QUEUE),
                     sig("evaluate_finetune", plan=full, tid="evaluate",
                         queue=EXTRACT_QUEUE)).on_error(on_error)
    header = [sig("extract_shard", light, _shard(s), tid=f"extract.{s.id}", queue=EXTRACT_QUEUE)
              for s in plan.shards if not s.cached]
    collect = sig("collect", plan=full, tid="collect")
    steps: list[Any] = [chord(group(header), collect) if header else
                        sig("collect", [], plan=full, tid="collect")]
    train = sig("train_probe", plan=full, tid="train")
    if plan.spec["probe"]["l2"] is None:
        sweeps = [sig("sweep_probe", plan=full, index=i, tid=f"sweep.{i}")
                  for i in range(len(grid_slices(plan)))]
        steps.append(chord(group(sweeps), train))
    else:
        steps.append(train)
    steps.append(sig("evaluate", plan=full, tid="evaluate"))
    return chain(*steps).on_error(on_error)


def signature(app: Celery, job_id: str, name: str, *args: Any, tid: str,
              queue: str = TRAIN_QUEUE, round_: int = 0, **kw: Any) -> Any:
    """One task of a job. Task ids name the job and the step: cancel can revoke them, Flower
    shows them. The arguments are shown as that name too: a repr of the plan would be 2 KB of
    noise in Flower and costs the sender ~1 ms a task to compute."""
    task_id = f"{job_id}.{tid}" + (f".r{round_}" if round_ else "")
    return app.signature(f"featurefleet.{name}", args=args, kwargs=kw, queue=queue,
                         task_id=task_id, argsrepr=f"({task_id!r})",
                         kwargsrepr="{" + ", ".join(sorted(kw)) + "}")


def send(app: Celery, plan: Plan, round_: int = 0) -> None:
    """Enqueue a job's canvas. The client never waits on Celery results (job state lives in
    Redis), so the result subscriptions are dropped at once: collected later they would talk
    to a broker that may be gone."""
    job_canvas(app, plan, round_).apply_async()
    consumer = app.backend.result_consumer
    consumer.subscribed_to.clear()
    consumer.stop()


def task_ids(plan: Plan) -> list[str]:
    """Every task id of a job's canvas (for revoking)."""
    if plan.strategy == "finetune":
        return [f"{plan.job_id}.finetune", f"{plan.job_id}.evaluate"]
    ids = [f"{plan.job_id}.extract.{s.id}" for s in plan.shards if not s.cached]
    ids += [f"{plan.job_id}.{t}" for t in ("collect", "train", "evaluate")]
    if plan.spec["probe"]["l2"] is None:
        ids += [f"{plan.job_id}.sweep.{i}" for i in range(len(grid_slices(plan)))]
    return ids


def _shard(s: Any) -> dict[str, Any]:
    return {"split": s.split, "start": s.start, "end": s.end, "path": s.path,
            "cached": s.cached}
