"""The job watchdog: no job stays RUNNING forever.

For each unfinished job it checks two things:

* the deadline (``created + FEATUREFLEET_JOB_DEADLINE_S``): past it, the job is FAILED with the
  reason;
* a stall: no progress for ``stall_s`` while none of the job's tasks is queued or held unacked
  by a worker. Then a message was lost (a Redis restart without data, an expired chord key, a
  dropped result) and the chord can no longer fire: the job's canvas is sent again. Tasks are
  idempotent (finished shards are reused), so only what is missing runs. After
  ``max_rounds`` re-dispatches the job is FAILED instead.

Run it as ``featurefleet watchdog`` next to the workers (one per broker is enough).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from pipeline.plan import Plan
from pipeline.state import FINAL, JobStore

DEADLINE_S = float(os.environ.get("FEATUREFLEET_JOB_DEADLINE_S", 24 * 3600))


def _job_tasks_pending(r: Any, job_id: str, queues: list[str]) -> bool:
    """Is any message of this job still in a queue or reserved (unacked) by a worker?"""
    needle = f'"{job_id}.'
    for q in queues:
        for raw in r.lrange(q, 0, -1):
            if needle in raw:
                return True
    return any(needle in raw for raw in r.hvals("unacked"))


def check_job(jobs: JobStore, job_id: str, broker: str, stall_s: float = 120.0,
              max_rounds: int = 3) -> str:
    """Check one job; returns what was done: ``ok``, ``final``, ``failed: ...``,
    ``redispatched``."""
    from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE

    st = jobs.get(job_id)
    if st.get("status") in FINAL:
        return "final"
    now = time.time()
    created = float(st.get("created", now))
    if now > created + DEADLINE_S:
        reason = (f"deadline passed ({DEADLINE_S:.0f} s after submission) in stage "
                  f"{st.get('stage')}; fix: retry it (featurefleet retry {job_id}) or raise "
                  "FEATUREFLEET_JOB_DEADLINE_S")
        jobs.finish(job_id, "FAILED", error=reason)
        return f"failed: {reason}"
    last = float(st.get("activity", st.get("started", created)))
    if now - last < stall_s or _job_tasks_pending(jobs.r, job_id, [EXTRACT_QUEUE, TRAIN_QUEUE]):
        return "ok"
    rounds = int(st.get("rounds", 0))
    if rounds >= max_rounds:
        reason = (f"no progress for {now - last:.0f} s and no task queued after {rounds} "
                  "re-dispatches; fix: check that workers consume ff.extract and ff.train")
        jobs.finish(job_id, "FAILED", error=reason)
        return f"failed: {reason}"
    from pathlib import Path

    from workers.app import make_app
    from workers.canvas import send

    plan = Plan.from_dict(json.loads((Path(st["job_dir"]) / "plan.json").read_text()))
    app = make_app(broker)
    try:
        send(app, plan, round_=rounds + 1)
    finally:
        app.close()
    jobs.update(job_id, rounds=rounds + 1, activity=now)
    return "redispatched"


def run(broker: str | None = None, every: float = 30.0, stall_s: float = 120.0,
        once: bool = False) -> None:
    """Check every unfinished recent job, forever (or ``once``)."""
    from pipeline.state import broker_url, connect

    jobs = JobStore(connect(broker, patient=True))
    while True:
        for st in jobs.recent(500):
            if st.get("status") not in FINAL:
                check_job(jobs, st["id"], broker_url(broker), stall_s=stall_s)
        if once:
            return
        time.sleep(every)
