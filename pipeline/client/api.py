"""The Python API: submit a job, look it up later, wait for it, read its result.

This is the client layer: it plans the job (:mod:`pipeline.planner`), saves the plan on shared
storage, creates the job record in Redis and sends the canvas (:mod:`workers.canvas`).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import BrokerError, JobError, SpecError
from pipeline.jobs.broker import broker_url, connect, redact
from pipeline.jobs.compare import settle
from pipeline.jobs.records import FINAL, JobStore
from pipeline.plan import Plan, PlanRef, check_job_id, check_plan, read_plan, read_spec
from pipeline.spec import JobSpec


class Job:
    """A handle on a submitted job (cheap; can be made from an id at any time).

    Example:
        >>> job = submit(JobSpec())            # doctest: +SKIP
        >>> job.wait(timeout=600)["status"]    # doctest: +SKIP
        'SUCCESS'
    """

    def __init__(self, job_id: str, broker: str | None = None) -> None:
        self.id = check_job_id(job_id)
        self.broker = broker_url(broker)
        self._jobs: JobStore | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def jobs(self) -> JobStore:
        if self._jobs is None:
            self._jobs = JobStore(connect(self.broker))
        return self._jobs

    def status(self) -> dict[str, Any]:
        """The job record: status, stage, progress counters, timings, error, report path.

        Raises:
            JobError: no such job (or its record was lost: the message says how to recover).
            BrokerError: Redis unreachable.
        """
        return {"id": self.id, **self.jobs.get(self.id)}

    def wait(self, timeout: float | None = None, poll: float = 0.5,
             on_progress: Any = None) -> dict[str, Any]:
        """Block until the job is final; return its status record.

        Raises:
            JobError: the timeout passed first, or the job's record disappeared.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if on_progress is not None:
                on_progress(st)
            if st["status"] in FINAL:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {self.id} still {st['status']} after {timeout:g} s; fix: "
                               "wait longer, or check workers are running (featurefleet status)")
            time.sleep(poll)

    def cancel(self) -> bool:
        """Cancel the job: it becomes CANCELLED, queued tasks are revoked (every round's), a
        running shard stops at its next batch without writing. Finished shards stay cached.

        Returns False when the job had already ended.
        """
        from workers.app import make_app

        if not self.jobs.finish(self.id, "CANCELLED", error="cancelled by the user",
                                stage="cancelled"):
            return False
        settle(self.jobs, self.id)
        ids = self.jobs.field(self.id, "task_ids") or []
        app = make_app(self.broker)
        try:
            app.control.revoke(ids)
        finally:
            app.close()
        return True

    def retry(self) -> Job:
        """Submit the job's spec again: valid shards are reused, so only what failed runs."""
        st = self.status()
        spec = read_spec(Path(st["job_dir"]))
        job = submit(spec, broker=self.broker)
        job.jobs.update(job.id, retry_of=self.id)
        return job

    def result(self) -> dict[str, Any]:
        """The report of a finished job (``report.json`` as a dict).

        Raises:
            JobError: the job failed, was cancelled, or is not finished.
        """
        st = self.status()
        if st["status"] != "SUCCESS":
            detail = f": {st.get('error')}" if st.get("error") else ""
            raise JobError(f"job {self.id} is {st['status']}{detail}; fix: "
                           + ("wait for it (job.wait())" if st["status"] not in FINAL
                              else "read the error, fix the cause and submit again"))
        return dict(json.loads(Path(st["report"]).read_text()))


def submit(spec: JobSpec, broker: str | None = None, compare_id: str | None = None) -> Job:
    """Validate, plan and enqueue a job; return its handle at once.

    Everything that can be checked is checked before anything is enqueued: the spec, the data,
    the backbone and weights names, the output folder and the broker.

    Raises:
        SpecError, DataError, BackboneError, StoreError, BrokerError.
    """
    from pipeline.planner import make_plan
    from pipeline.store.files import check_writable

    job_id = uuid.uuid4().hex[:12]
    # data, backbone and weights are checked first; the fleet is asked for GPUs only by auto
    plan = make_plan(spec, job_id, lambda: fleet_gpus(JobStore(connect(broker)), broker))
    check_plan(plan)
    jobs = JobStore(connect(broker))
    check_nodes(plan, broker)
    check_writable(plan.job_dir)
    check_writable(plan.shard_dir)
    ref = plan.save()
    dispatch(jobs, plan, ref, broker, compare_id=compare_id)
    return Job(job_id, broker)


def dispatch(jobs: JobStore, plan: Plan, ref: PlanRef, broker: str | None, round_: int = 0,
             compare_id: str | None = None, fresh: bool = True, **fields: Any) -> None:
    """Send the job's canvas (round ``round_``); with ``fresh``, (re-)create its record first,
    else add the round's task ids to the record (a re-dispatch keeps the counters).

    Raises:
        BrokerError: the canvas could not be sent.
    """
    from workers.app import make_app
    from workers.canvas import job_canvas, send, task_ids

    app = make_app(broker)
    try:
        canvas = job_canvas(app, plan, ref, round_)
        if not fresh:
            jobs.add_task_ids(plan.job_id, task_ids(canvas))
            jobs.update(plan.job_id, rounds=round_, **fields)
        else:
            jobs.create(plan.job_id, record_fields(plan, ref, round_, task_ids(canvas),
                                                   compare_id, **fields))
        try:
            send(app, canvas)
        except Exception as exc:
            jobs.finish(plan.job_id, "FAILED", error=f"could not enqueue: {exc!r}")
            raise BrokerError(f"could not enqueue job {plan.job_id} on "
                              f"{redact(broker_url(broker))!r} ({exc.__class__.__name__}); "
                              "fix: check the broker is up") from None
    finally:
        app.close()


def record_fields(plan: Plan, ref: PlanRef, round_: int, ids: list[str],
                  compare_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A new job record's fields: what the client and ``featurefleet status`` show."""
    todo = [s for s in plan.shards if not s.cached]
    return {"name": plan.spec.name, "job_dir": str(plan.job_dir), "stage": "queued",
            "plan": ref.to_message(), "rounds": round_,
            "shards_total": len(plan.shards), "shards_cached": len(plan.shards) - len(todo),
            "shards_done": 0, "images_total": sum(s.rows for s in plan.shards),
            "images_cached": sum(s.rows for s in plan.shards if s.cached),
            "images_skipped": 0, "backbone": plan.spec.backbone.name, "task_ids": ids,
            "kind": plan.kind, "strategy": plan.strategy,
            "modality": plan.backbone.preprocessing.get("modality", "image"),
            "quality_parts_total": len(plan.quality.parts()) if plan.quality else 0,
            "strategy_reason": plan.strategy_reason,
            **({"compare_id": compare_id} if compare_id else {}), **fields}


def recover(job_dir: str | Path, broker: str | None = None,
            expect_id: str | None = None) -> Job:
    """Bring back a job whose record was lost (Redis restarted without its data), from the
    plan on shared storage: its record is made again and its canvas sent again; shards that
    were finished are reused by their tasks. Everything is checked before anything is sent.

    Raises:
        JobError: the folder holds no readable plan, another job's plan (``expect_id``), a
            copy of a plan, a finished job, or the job's record still exists.
        SpecError: the plan writes outside $FEATUREFLEET_ALLOWED_ROOTS.
    """
    jobs = JobStore(connect(broker))
    plan, ref = recoverable(jobs, Path(job_dir), expect_id)
    dispatch(jobs, plan, ref, broker, round_=1, recovered=time.time())
    return Job(plan.job_id, broker)


def recoverable(jobs: JobStore, job_dir: Path, expect_id: str | None = None
                ) -> tuple[Plan, PlanRef]:
    """The plan of a job that may be recovered from ``job_dir``, and its reference.

    Raises:
        JobError: not recoverable (the message says why and what to do instead).
        SpecError: the plan writes outside $FEATUREFLEET_ALLOWED_ROOTS.
    """
    import hashlib

    plan = read_plan(job_dir)
    if expect_id is not None and plan.job_id != expect_id:
        raise JobError(f"{str(job_dir)!r} holds job {plan.job_id}, not {expect_id}; nothing "
                       f"was sent; fix: pass <output>/jobs/{expect_id}")
    try:
        same = plan.path.resolve() == (Path(job_dir) / "plan.json").resolve()
    except OSError:
        same = False
    if not same:
        raise JobError(f"{str(job_dir)!r} holds a copy of job {plan.job_id}'s plan (its own "
                       f"folder is {str(plan.job_dir)!r}); nothing was sent; fix: recover "
                       "from the job's own folder")
    check_plan(plan)  # the client's allowed roots hold for recovered jobs too
    if (plan.job_dir / "report.json").exists():
        raise JobError(f"job {plan.job_id} finished: its report is "
                       f"{str(plan.job_dir / 'report.json')!r}; nothing was sent (a finished "
                       f"job is never run again); fix: featurefleet submit "
                       f"{str(plan.job_dir / 'spec.json')!r} for a new run")
    if jobs.exists(plan.job_id):
        raise JobError(f"job {plan.job_id} still has its record (status "
                       f"{jobs.field(plan.job_id, 'status')}); fix: featurefleet retry "
                       f"{plan.job_id} submits it again")
    text = plan.path.read_text()
    return plan, PlanRef(job_id=plan.job_id, path=str(plan.path),
                         sha256=hashlib.sha256(text.encode()).hexdigest())


def check_nodes(plan: Plan, broker: str | None = None) -> None:
    """A multi-node training run needs that many worker processes on the GPU queue, online
    now (each node is one task holding one of them for the whole run).

    Raises:
        SpecError: ``nodes`` is above the worker processes that consume ``ff.extract``.
    """
    from workers.settings import EXTRACT_QUEUE

    if plan.program is None or plan.training.nodes <= 1:
        return
    nodes = plan.training.nodes
    online = len(queue_consumers(broker).get(EXTRACT_QUEUE, []))
    if nodes > online:
        raise SpecError(f"{plan.program}.nodes", f"{nodes} nodes, but {online} worker "
                        f"process(es) consume the GPU queue ({EXTRACT_QUEUE}) now",
                        f"start {nodes - online} more (featurefleet worker --gpus all on each "
                        f"GPU machine), or set {plan.program}.nodes to at most {max(1, online)}")


def fleet_gpus(jobs: JobStore, broker: str | None = None, timeout: float = 1.0) -> int:
    """GPUs on the workers that answer a ping now (as each announced them at start)."""
    return jobs.fleet_gpus(live_workers(broker, timeout))


def live_workers(broker: str | None = None, timeout: float = 1.0) -> list[str]:
    """Names of the workers that answer a ping now."""
    from workers.app import make_app

    app = make_app(broker)
    try:
        return [name for reply in app.control.ping(timeout=timeout) or [] for name in reply]
    finally:
        app.close()


def queue_consumers(broker: str | None = None, timeout: float = 1.0) -> dict[str, list[str]]:
    """Which workers consume which queue, as the workers online answer now."""
    from workers.app import make_app

    app = make_app(broker)
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    finally:
        app.close()
    out: dict[str, list[str]] = {}
    for worker, queues in replies.items():
        for q in queues or []:
            out.setdefault(str(q.get("name")), []).append(worker)
    return {q: sorted(w) for q, w in out.items()}


def missing_consumers(job: Job, broker: str | None = None) -> list[str]:
    """The queues a submitted job still needs that no worker online consumes."""
    from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE

    st = job.status()
    needed = [TRAIN_QUEUE]
    if st.get("strategy") == "finetune" or int(st.get("shards_total", 0)) > int(
            st.get("shards_cached", 0)):
        needed.insert(0, EXTRACT_QUEUE)
    consumers = queue_consumers(broker)
    return [q for q in needed if not consumers.get(q)]


def get_job(job_id: str, broker: str | None = None) -> Job:
    """The handle of an existing job (checks it exists)."""
    job = Job(job_id, broker)
    job.status()
    return job
