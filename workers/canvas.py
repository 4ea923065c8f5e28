"""The one place that builds Celery canvases from plans.

A job is ``chord(extract_shard per uncached shard) -> train_probe -> evaluate``, with an error
callback that marks the job FAILED. No task waits on another.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, chord, group

from pipeline.plan import Plan
from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE


def job_canvas(app: Celery, plan: Plan) -> Any:
    """The signature that runs a whole job."""
    full = plan.to_dict()
    light = {**full, "shards": []}  # extraction tasks need the recipe, not the shard list
    on_error = app.signature("featurefleet.fail_job", args=(plan.job_id,), queue=TRAIN_QUEUE)
    body = chain(
        app.signature("featurefleet.train_probe", kwargs={"plan": full}, queue=TRAIN_QUEUE),
        app.signature("featurefleet.evaluate", kwargs={"plan": full}, queue=TRAIN_QUEUE),
    )
    header = [
        app.signature("featurefleet.extract_shard", args=(light, _shard(s)), queue=EXTRACT_QUEUE,
                      shadow=f"extract_shard[{plan.job_id}:{s.id}]")
        for s in plan.shards if not s.cached
    ]
    if not header:  # everything cached: no extraction task at all
        canvas = chain(app.signature("featurefleet.train_probe", args=([],),
                                     kwargs={"plan": full}, queue=TRAIN_QUEUE),
                       app.signature("featurefleet.evaluate", kwargs={"plan": full},
                                     queue=TRAIN_QUEUE))
        return canvas.on_error(on_error)
    return chord(group(header), body).on_error(on_error)


def _shard(s: Any) -> dict[str, Any]:
    return {"split": s.split, "start": s.start, "end": s.end, "path": s.path,
            "cached": s.cached}
