"""The job side of a data-parallel training run (``pretrain``, ``finetune``): one task per
node starts torchrun and supervises it; the chord body collects the outcome.

A run is cut into time slices (``FEATUREFLEET_FINETUNE_SLICE_S``, half the task time limit by
default): past its deadline the program checkpoints and stops, and the next slice's tasks
resume it, so no task normally outlives the visibility timeout. A node task delivered again
(its worker or host lost) resumes from the checkpoint; in a multi-node run every node then
meets again (a new generation of the meeting) and resumes together. A run that fails anyway
resumes when the job is run again (pretraining checkpoints are kept by content, see
:func:`run_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.engine.launch import Node, argv, log_tail, supervise
from pipeline.errors import JobCancelled, JobError, NodeBusy
from pipeline.fsio import atomic_write_text
from pipeline.jobs.nodes import (
    Lease,
    Meeting,
    free_port,
    generation,
    interface_of,
    meet,
    regroup,
    regroups,
)
from pipeline.jobs.records import FINAL, JobStore
from pipeline.plan import Plan, PlanMessage, load_plan
from pipeline.settings import get_settings

logger = logging.getLogger(__name__)


def run_dir(plan: Plan, program: str) -> Path:
    """Where a run keeps its checkpoints. Fine-tuning: the job's folder. Pretraining: a folder
    named by everything that determines the encoder (data, samples, architecture, initial
    weights, input size, method and its settings, seed), so running a failed or cancelled job
    again resumes it, and running a finished one again reuses it."""
    if program == "finetune":
        return plan.job_dir / "finetune"
    cfg = plan.spec.pretrain.model_dump(exclude={"nodes", "eval_every_epochs",
                                                  "checkpoint_every_steps", "max_restarts",
                                                  "device"})
    parts = {"data": plan.fingerprint, "train": sorted(plan.splits.train + plan.splits.val),
             "arch": plan.backbone.name, "weights": plan.backbone.weights_sha256,
             "preprocessing": plan.backbone.preprocessing, "pretrain": cfg,
             "seed": plan.spec.data.seed}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return Path(plan.spec.output) / "pretrain" / key


def _gpus_here() -> int:
    from pipeline.devices import visible_gpus

    return len(visible_gpus())


def run_node(jobs: JobStore, ref: PlanMessage, program: str, part: int, slot: int, round_: int = 0,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One node of time slice ``part``: start torchrun, supervise it, return rank 0's outcome
    (``state``: done with ``summary``, or continue).

    One node, one live execution: a second delivery of the task (the visibility timeout
    passed while this one runs, or its host was lost) finds the first's lease
    (:class:`~pipeline.jobs.nodes.Lease`): it returns the first's outcome when there is one,
    takes over when the first died, and otherwise raises :class:`NodeBusy` (the task is
    retried later: a waiting duplicate must not hold the worker the lost node needs). On one
    node, torchrun restarts failed ranks itself (``max_restarts``); when torchrun
    itself is lost (its agent killed, or it gave up after the run checkpointed again) this
    task starts it again, at most ``max_restarts`` times. Across nodes no agent restarts
    ranks on its own: a failed torchrun, or a node task that came back, regroups every node
    (:func:`~pipeline.jobs.nodes.regroup`), at most ``max_restarts`` times. Each way, the ranks
    resume from the last checkpoint and the report lists the resume.

    Raises:
        JobCancelled: the job was cancelled (its ranks were stopped).
        JobError: the run failed (a rank's error, or the end of the node's log), it regrouped
            or relaunched more than ``max_restarts`` times, or the nodes did not all join.
        NodeBusy: another delivery of this node task is running.
    """
    from pipeline.jobs.steps import live

    plan = load_plan(ref)
    if program != plan.program:
        raise JobError(f"job {plan.job_id} runs {plan.program!r}, not {program!r}; fix: send "
                       "tasks built by workers.canvas")
    live(jobs, plan, program)
    lease = Lease(jobs, plan.job_id, f"{program}.{part}.{round_}.{slot}")
    # A delivery again (the visibility timeout passed, or the host was lost) returns the
    # outcome when any delivery finished this node's slice, even one that finished after
    # this message came back: running the slice again would regroup the finished run.
    state, outcome = lease.check()
    if outcome is not None:
        return outcome
    if state == "busy":  # never hold a worker to wait: the lost node's task needs one
        raise NodeBusy(f"node {slot} of job {plan.job_id} runs in another delivery; this "
                       "one checks again later (and takes over if that one died)")
    try:
        result = _run_node(jobs, plan, ref, program, part, slot, round_, on_progress, lease)
    except BaseException:
        lease.release()
        raise
    lease.release(result)
    return result


def _run_node(jobs: JobStore, plan: Plan, ref: PlanMessage, program: str, part: int, slot: int,
              round_: int, on_progress: Callable[[dict[str, Any]], None] | None,
              lease: Lease) -> dict[str, Any]:
    from pipeline.jobs.steps import count_attempt

    cfg = plan.training
    attempts = count_attempt(jobs, plan, f"{program}.{part}.{slot}", f"{program} (node {slot})")
    out_dir = run_dir(plan, program)
    out_dir.mkdir(parents=True, exist_ok=True)
    nproc = max(1, _gpus_here()) if cfg.device != "cpu" else 1
    multi = cfg.nodes > 1
    mkey = part + 1000 * round_  # the meetings of this slice (and watchdog round)
    gen = generation(jobs, plan.job_id, program, mkey) if multi else 0
    if multi and attempts > 1:  # this node was lost, its task came back
        gen = regroup(jobs, plan.job_id, program, mkey, gen,
                      f"node {slot}'s task came back (attempt {attempts})")
    tag = f"p{part}-r{round_}-a{1 if multi else attempts}"
    status_file = out_dir / f"status-{tag}.json"
    log = out_dir / f"node-{tag}-n{slot}.log"
    last = {"at": 0.0}
    why = {"stop": ""}

    def tick() -> bool:  # every second: the job's progress to Flower, cancel, regroup
        if time.monotonic() - last["at"] < 1.0:
            return False
        last["at"] = time.monotonic()
        if not lease.renew():
            why["stop"] = "lease"
            return True
        st = jobs.get(plan.job_id)
        if on_progress is not None and isinstance(st.get(program), dict):
            on_progress(st[program])
        if st.get("status") in FINAL:
            why["stop"] = "final"
        elif multi and generation(jobs, plan.job_id, program, mkey) > gen:
            why["stop"] = "regroup"
        return bool(why["stop"])

    relaunch = 0
    meeting: Meeting | None = None  # multi-node runs only
    while True:
        if multi:  # a run that keeps losing nodes ends in bounded time
            if gen > cfg.max_restarts:
                history = "; ".join(f"{e['gen']}: {e['why']}" for e in
                                    regroups(jobs, plan.job_id, program, mkey))
                raise JobError(f"the {cfg.nodes}-node {program} run regrouped {gen} times "
                               f"(a node or its torchrun lost each time; "
                               f"{program}.max_restarts is {cfg.max_restarts}): [{history}] "
                               f"{log_tail(log, 4)}; fix: check the workers' hosts and "
                               "network, then featurefleet retry (it resumes)")
            timeout = 300.0 if gen == 0 else max(300.0, get_settings().visibility + 60.0)
            meeting = meet(jobs, plan.job_id, program, mkey, slot, cfg.nodes, nproc, timeout,
                           gen, _every(lambda: _still_mine(lease, slot, plan.job_id)))
            gen = meeting.gen
            if meeting.is_host:
                jobs.update(plan.job_id, rendezvous=meeting.endpoint, regroups=gen)
            # torchrun restarts no rank by itself: a failure regroups every node together
            node = Node(cfg.nodes, nproc, meeting.endpoint, meeting.is_host, meeting.run_id,
                        0, local_addr=meeting.address)
        else:  # this machine alone: a private store on loopback
            node = Node(1, nproc, f"127.0.0.1:{free_port('127.0.0.1')}", True,
                        f"{plan.job_id}-{program}-{part}-{attempts}-{relaunch}",
                        cfg.max_restarts)
        runfile = out_dir / f"run-{tag}-n{slot}.json"
        atomic_write_text(runfile, RunFile(
            ref=ref, part=part, attempt=attempts, relaunch=relaunch, regroup=gen,
            slice_s=get_settings().finetune_slice, device=cfg.device, out_dir=str(out_dir),
            status_file=str(status_file), **({} if meeting is None else {
                "endpoint": meeting.endpoint, "address": meeting.address,
                "is_host": meeting.is_host})).model_dump_json())
        before = _checkpoint_mtime(out_dir)
        why["stop"] = ""
        code = supervise(argv(node, "pipeline.jobs.ranks", str(runfile)),
                         _rank_env(meeting, nproc), log, tick)
        if code == -1 and why["stop"] == "regroup":
            gen = generation(jobs, plan.job_id, program, mkey)
            continue
        if code == -1 and why["stop"] == "lease":
            raise JobError(f"{program} node {slot}: another delivery of this node's task took "
                           "it over (this worker stopped renewing its lease: it was stalled)")
        if code == -1:
            raise JobCancelled(f"job {plan.job_id} was cancelled during {program}")
        if code == 0:
            break
        failed = _rank_error(status_file)
        if failed is not None:  # a rank's own error (bad data, a batch that cannot fit)
            raise JobError(f"{program}: {failed}")
        if multi:  # a peer lost, or this node's torchrun: every node meets again
            gen = regroup(jobs, plan.job_id, program, mkey, gen,
                          f"node {slot}'s torchrun exited {code} in generation {gen}")
            continue
        # torchrun lost (killed: a negative status) or given up after new checkpoints: the
        # run is resumable from last.pt; a run that never checkpointed again is not retried
        progressed = _checkpoint_mtime(out_dir) not in (None, before)
        if relaunch >= cfg.max_restarts or not (code < 0 or progressed) \
                or _checkpoint_mtime(out_dir) is None:
            raise JobError(f"{program} node {slot} failed (torchrun exit {code}, relaunched "
                           f"{relaunch} time(s)): {log_tail(log, 6)}; fix: read {log}")
        relaunch += 1
        jobs.update(plan.job_id, relaunches=relaunch)
        logger.warning(
            "job %s: %s node %d lost its torchrun (exit %d): relaunch %d of %d from the last "
            "checkpoint", plan.job_id, program, slot, code, relaunch, cfg.max_restarts)
    deadline = time.monotonic() + 30  # rank 0 may run on another node: shared storage lags
    while not status_file.is_file():
        lease.renew()
        if time.monotonic() > deadline:
            raise JobError(f"{program} node {slot}: rank 0 left no outcome at {status_file}; "
                           "fix: workers need the job's output folder on shared storage")
        time.sleep(0.5)
    outcome = json.loads(status_file.read_text())
    if outcome.get("state") == "error":
        raise JobError(f"{program}: {outcome.get('error')}")
    return {"part": part, "slot": slot, **outcome}


class RunFile(BaseModel):
    """What a node task tells its ranks (``python -m pipeline.jobs.ranks <run file>``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ref: dict[str, str]
    part: int
    attempt: int
    relaunch: int = 0
    regroup: int = 0
    slice_s: float | None
    device: str
    out_dir: str
    status_file: str
    # where this node meets the others (for whoever debugs a fleet: which node served the
    # rendezvous store, at which address; empty for a single machine)
    endpoint: str = ""
    address: str = ""
    is_host: bool = False


def _still_mine(lease: Lease, slot: int, job_id: str) -> bool:
    """While a node waits for its peers: renew its lease. If another delivery of this node
    task finished the slice meanwhile (this one took a lease that had lapsed under load),
    step aside: the task is retried and returns that outcome.

    Raises:
        NodeBusy: the other delivery's outcome is recorded.
    """
    if lease.r.exists(lease.outcome_key):
        raise NodeBusy(f"node {slot} of job {job_id}: another delivery finished this slice "
                       "while this one waited for its peers; its outcome is taken on retry")
    return lease.renew()


def _every(check: Callable[[], bool], seconds: float = 2.0) -> Callable[[], bool]:
    """``check``, called at most once per ``seconds`` (True in between)."""
    last = {"at": 0.0, "ok": True}

    def throttled() -> bool:
        if time.monotonic() - last["at"] >= seconds:
            last["at"], last["ok"] = time.monotonic(), check()
        return bool(last["ok"])

    return throttled


def _rank_env(meeting: Meeting | None, nproc: int) -> dict[str, str]:
    """The ranks' environment: how many ranks share this machine; across hosts, the network
    interface gloo/NCCL use (the one the other nodes reach; unless the operator chose one)."""
    env = {"FEATUREFLEET_RANKS_HERE": str(meeting.ranks_here if meeting else nproc)}
    if meeting is not None:
        iface = interface_of(meeting.address)
        if iface is not None:
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                if not os.environ.get(var):
                    env[var] = iface
    return env


def _checkpoint_mtime(out_dir: Path) -> float | None:
    try:
        return (out_dir / "last.pt").stat().st_mtime_ns / 1e9
    except OSError:
        return None


def _rank_error(status_file: Path) -> str | None:
    try:
        outcome = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return None
    return str(outcome.get("error")) if outcome.get("state") == "error" else None


def run_done(jobs: JobStore, ref: PlanMessage, program: str, part: int,
             results: list[dict[str, Any]]) -> dict[str, Any]:
    """Collect a time slice's nodes: the summary when the run is done, else the next part."""
    plan = load_plan(ref)
    states = {r.get("state") for r in results}
    if "cancelled" in states:
        raise JobCancelled(f"job {plan.job_id} was cancelled during {program}")
    if not results or states - {"done", "continue"}:
        raise JobError(f"{program} part {part} of job {plan.job_id} ended with {states}")
    if "continue" in states:
        return {"continue": True, "part": part + 1}
    summary = next(r["summary"] for r in results if r["summary"].get("history") is not None)
    jobs.update(plan.job_id, train_seconds=summary.get("seconds"),
                resumes=len(summary.get("resumes", [])))
    return dict(summary)


def run_finish_pretrain(jobs: JobStore, ref: PlanMessage,
                        summary: dict[str, Any]) -> dict[str, Any]:
    """Write the pretraining report and mark the job SUCCESS (its encoder is now usable as
    ``backbone: {name: job:<id>}``)."""
    from pipeline.jobs.steps import live
    from pipeline.reports import pretrain

    plan = load_plan(ref)
    live(jobs, plan, "report")
    rep = pretrain.build(plan, jobs.get(plan.job_id), summary)
    path = pretrain.write(rep, plan.job_dir)
    jobs.finish(plan.job_id, "SUCCESS", report=str(path), stage="done",
                encoder=rep["encoder"])
    return {"report": str(path), "encoder": rep["encoder"]}
