"""The one place that builds Celery canvases from plans.

A job is::

    chord(extract_shard per uncached shard) -> collect
      -> chord(sweep_probe per grid slice) -> train_probe -> evaluate

(with a fixed L2 penalty the sweep chord is skipped: collect -> train_probe -> evaluate). An
error callback marks the job FAILED. No task waits on another.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, chord, group

from pipeline.plan import Plan
from pipeline.train import grid_slices
from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE


def job_canvas(app: Celery, plan: Plan) -> Any:
    """The signature that runs a whole job."""
    full = plan.to_dict()
    light = {**full, "shards": []}  # tasks that need the recipe, not the shard list

    def sig(name: str, *args: Any, queue: str = TRAIN_QUEUE, **kw: Any) -> Any:
        return app.signature(f"featurefleet.{name}", args=args, kwargs=kw, queue=queue)

    on_error = sig("fail_job", plan.job_id)
    header = [
        app.signature("featurefleet.extract_shard", args=(light, _shard(s)), queue=EXTRACT_QUEUE,
                      shadow=f"extract_shard[{plan.job_id}:{s.id}]")
        for s in plan.shards if not s.cached
    ]
    collect = sig("collect", plan=full)
    steps: list[Any] = [chord(group(header), collect) if header else
                        app.signature("featurefleet.collect", args=([],), kwargs={"plan": full},
                                      queue=TRAIN_QUEUE)]
    train = sig("train_probe", plan=full)
    if plan.spec["probe"]["l2"] is None:
        sweeps = [sig("sweep_probe", plan=full, index=i) for i in range(len(grid_slices(plan)))]
        steps.append(chord(group(sweeps), train))
    else:
        steps.append(train)
    steps.append(sig("evaluate", plan=full))
    return chain(*steps).on_error(on_error)


def _shard(s: Any) -> dict[str, Any]:
    return {"split": s.split, "start": s.start, "end": s.end, "path": s.path,
            "cached": s.cached}
