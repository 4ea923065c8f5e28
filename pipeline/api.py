"""The Python API: submit a job, look it up later, wait for it, read its result."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import BrokerError, JobError
from pipeline.spec import JobSpec
from pipeline.state import FINAL, JobStore, broker_url, connect, redact


class Job:
    """A handle on a submitted job (cheap; can be made from an id at any time).

    Example:
        >>> job = submit(JobSpec())            # doctest: +SKIP
        >>> job.wait(timeout=600)["status"]    # doctest: +SKIP
        'SUCCESS'
    """

    def __init__(self, job_id: str, broker: str | None = None) -> None:
        self.id = job_id
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
            JobError: no such job.  BrokerError: Redis unreachable.
        """
        return {"id": self.id, **self.jobs.get(self.id)}

    def wait(self, timeout: float | None = None, poll: float = 0.5,
             on_progress: Any = None) -> dict[str, Any]:
        """Block until the job is final; return its status record.

        Raises:
            JobError: the timeout passed first.
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
        """Cancel the job: it becomes CANCELLED, queued tasks are revoked, a running shard stops
        at its next batch without writing. Finished shards stay in the cache.

        Returns False when the job had already ended.
        """
        from workers.app import make_app

        if not self.jobs.finish(self.id, "CANCELLED", error="cancelled by the user",
                                stage="cancelled"):
            return False
        from pipeline.compare import settle

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
        spec = JobSpec.from_dict(json.loads((Path(st["job_dir"]) / "spec.json").read_text()))
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
        return json.loads(Path(st["report"]).read_text())


def submit(spec: JobSpec, broker: str | None = None, compare_id: str | None = None) -> Job:
    """Validate, plan and enqueue a job; return its handle at once.

    Everything that can be checked is checked before anything is enqueued: the spec, the data,
    the backbone and weights names, the output folder and the broker.

    Raises:
        SpecError, DataError, BackboneError, StoreError, BrokerError.
    """
    from pipeline.plan import check_plan, make_plan
    from workers.app import make_app
    from workers.canvas import send, task_ids

    spec.validate()
    job_id = uuid.uuid4().hex[:12]
    # data, backbone and weights are checked first; the fleet is asked for GPUs only by auto
    plan = make_plan(spec, job_id, lambda: fleet_gpus(JobStore(connect(broker)), broker))
    check_plan(plan)
    jobs = JobStore(connect(broker))
    from pipeline.store import check_writable

    check_writable(plan.job_dir)
    check_writable(plan.shard_dir)
    (plan.job_dir / "spec.json").write_text(json.dumps(plan.spec, indent=2))
    (plan.job_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    todo = [s for s in plan.shards if not s.cached]
    jobs.create(job_id, {
        "name": spec.name, "job_dir": str(plan.job_dir), "stage": "queued",
        "shards_total": len(plan.shards), "shards_cached": len(plan.shards) - len(todo),
        "shards_done": 0, "images_total": sum(s.rows for s in plan.shards),
        "images_cached": sum(s.rows for s in plan.shards if s.cached),
        "images_skipped": 0, "backbone": spec.backbone.name, "task_ids": task_ids(plan),
        "strategy": plan.strategy, "strategy_reason": plan.strategy_reason,
        **({"compare_id": compare_id} if compare_id else {}),
    })
    app = make_app(broker)
    try:
        send(app, plan)
    except Exception as exc:
        jobs.finish(job_id, "FAILED", error=f"could not enqueue: {exc!r}")
        raise BrokerError(f"could not enqueue job {job_id} on {redact(broker_url(broker))!r} "
                          f"({exc.__class__.__name__}); fix: check the broker is up") from None
    finally:
        app.close()
    return Job(job_id, broker)


def fleet_gpus(jobs: JobStore, broker: str | None = None, timeout: float = 1.0) -> int:
    """GPUs on the workers that answer a ping now (as each announced them at start)."""
    from workers.app import make_app

    app = make_app(broker)
    try:
        live = [name for reply in app.control.ping(timeout=timeout) for name in reply]
    finally:
        app.close()
    return jobs.fleet_gpus(live)


def get_job(job_id: str, broker: str | None = None) -> Job:
    """The handle of an existing job (checks it exists)."""
    job = Job(job_id, broker)
    job.status()
    return job
