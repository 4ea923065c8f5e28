"""The job watchdog: no job stays RUNNING forever, and no job is lost with Redis.

For each unfinished job it checks two things:

* the deadline (``created + FEATUREFLEET_JOB_DEADLINE_S``): past it, the job is FAILED with the
  reason;
* a stall: no progress for ``stall_s`` while none of the job's tasks is queued or held unacked
  by a worker. Then a message was lost (an expired chord key, a dropped result) and the chord
  can no longer fire: the job's canvas is sent again. Tasks are idempotent (finished shards are
  reused), so only what is missing runs. After ``max_rounds`` re-dispatches the job is FAILED.

With ``recover`` folders (``<output>/jobs``) it also finds jobs whose plan is on shared storage
but whose record is gone from Redis (restarted without its data) and brings them back.

Run it as ``featurefleet watchdog`` next to the workers (one per broker is enough).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.errors import FeaturefleetError
from pipeline.jobs.broker import broker_url, connect
from pipeline.jobs.records import FINAL, JobStore
from pipeline.plan import JOB_ID, PlanRef, read_plan
from pipeline.settings import get_settings

log = logging.getLogger(__name__)


def _job_tasks_pending(r: Any, job_id: str, queues: tuple[str, ...]) -> bool:
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
    from pipeline.client.api import dispatch
    from workers.settings import QUEUES

    st = jobs.get(job_id)
    if st.get("status") in FINAL:
        return "final"
    now = time.time()
    created = float(st.get("created", now))
    deadline_s = get_settings().job_deadline_s
    if now > created + deadline_s:
        reason = (f"deadline passed ({deadline_s:.0f} s after submission) in stage "
                  f"{st.get('stage')}; fix: retry it (featurefleet retry {job_id}) or raise "
                  "FEATUREFLEET_JOB_DEADLINE_S")
        jobs.finish(job_id, "FAILED", error=reason)
        return f"failed: {reason}"
    last = float(st.get("activity", st.get("started", created)))
    if now - last < stall_s or _job_tasks_pending(jobs.r, job_id, QUEUES):
        return "ok"
    rounds = int(st.get("rounds", 0))
    if rounds >= max_rounds:
        reason = (f"no progress for {now - last:.0f} s and no task queued after {rounds} "
                  "re-dispatches; fix: check that workers consume ff.extract and ff.train")
        jobs.finish(job_id, "FAILED", error=reason)
        return f"failed: {reason}"
    plan = read_plan(st["job_dir"])
    ref = PlanRef.model_validate(st["plan"])
    dispatch(jobs, plan, ref, broker, round_=rounds + 1, fresh=False, activity=now)
    return "redispatched"


def lost_jobs(jobs: JobStore, folders: list[Path]) -> list[Path]:
    """Job folders with a plan but no report, no error and no record in Redis."""
    out = []
    for folder in folders:
        for plan in sorted(folder.glob("*/plan.json")):
            d = plan.parent
            if JOB_ID.match(d.name) and not (d / "report.json").exists() \
                    and not (d / "error.json").exists() and not jobs.exists(d.name):
                out.append(d)
    return out


def recover_lost(jobs: JobStore, folders: list[Path], broker: str) -> list[str]:
    """Re-create the record of every lost job under ``folders`` and send its canvas again
    (a folder that cannot be recovered, e.g. a copy of a finished job's plan, is skipped and
    logged; nothing of it is sent)."""
    from pipeline.client.api import dispatch, recoverable

    recovered = []
    for d in lost_jobs(jobs, folders):
        try:
            plan, ref = recoverable(jobs, d, expect_id=d.name)
        except FeaturefleetError as exc:
            log.warning("watchdog: not recovering %s: %s", d, exc)
            continue
        dispatch(jobs, plan, ref, broker, round_=1, recovered=time.time())
        recovered.append(plan.job_id)
    return recovered


def run(broker: str | None = None, every: float = 30.0, stall_s: float = 120.0,
        once: bool = False, recover: list[Path] | None = None) -> None:
    """Check every unfinished recent job (and recover lost ones), forever (or ``once``)."""
    url = broker_url(broker)
    jobs = JobStore(connect(url, patient=True))
    while True:
        if recover:
            recover_lost(jobs, recover, url)
        for st in jobs.recent(500):
            if st.get("status") not in FINAL:
                check_job(jobs, st["id"], url, stall_s=stall_s)
        if once:
            return
        time.sleep(every)
