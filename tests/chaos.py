"""Test-only worker plugin: injects faults into real worker processes. Production code has no
fault switches; fault tests start workers with ``--include tests.chaos`` and these variables:

* ``CHAOS_CRASH_SHARD=<start>-<end>``: the pool child that runs that extraction task kills
  itself (SIGKILL) as soon as the task counted its start, as an out-of-memory kill would,
  every time it is delivered (within the attempt limit: a start beyond it does no work).
* ``CHAOS_CRASH_AFTER_CHECKPOINT=1``: once per job, the pool child of the training node
  task that runs torchrun (a node of a fine-tuning run) kills itself as soon as a checkpoint
  of this task exists and the agent is alive, as a preemption would (its torchrun and ranks
  die with it); later deliveries run on.
* ``CHAOS_KILL_AGENT_AFTER_CHECKPOINT=1``: once per job, the training node task that runs
  torchrun SIGKILLs its agent alone as soon as a checkpoint of this task exists and the
  agent is alive, leaving the task's own process alive (an operator's ``kill -9``, an agent
  OOM); the job's ``.chaos-agent-killed`` then says whether the agent's ranks died with it.
* ``CHAOS_SLOW_SHARD_S=<seconds>``: every extraction task sleeps this long first (keeps a task
  running while the test does something to it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun

from pipeline.plan import load_plan


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@task_prerun.connect
def _inject(sender: Any = None, task_id: str = "", args: Any = (), kwargs: Any = None,
            **_: Any) -> None:
    name = getattr(sender, "name", "")
    if name == "featurefleet.extract_shard":
        shard = args[1] if len(args) > 1 else (kwargs or {}).get("shard_id")
        if os.environ.get("CHAOS_CRASH_SHARD") and shard == os.environ["CHAOS_CRASH_SHARD"]:
            _kill_after_start_counted(str(args[0]["job_id"]), str(shard))
        delay = float(os.environ.get("CHAOS_SLOW_SHARD_S", "0") or 0)
        if delay:
            time.sleep(delay)
    elif name == "featurefleet.train_node" and os.environ.get("CHAOS_CRASH_AFTER_CHECKPOINT"):
        plan = load_plan(args[0])
        marker = plan.job_dir / ".chaos-crashed"
        if not marker.exists():  # the pool child dies, and its torchrun and ranks with it
            _once_after_checkpoint(plan.job_dir / "finetune" / "last.pt", marker, task_id,
                                   time.time(), lambda _agents: _kill_self())
    elif name == "featurefleet.train_node" and os.environ.get(
            "CHAOS_KILL_AGENT_AFTER_CHECKPOINT"):
        from pipeline.jobs.training import run_dir

        plan = load_plan(args[0])
        marker = plan.job_dir / ".chaos-agent-killed"
        if not marker.exists():  # the agent dies (its ranks with it), the task lives on
            _once_after_checkpoint(run_dir(plan, str(plan.program)) / "last.pt", marker,
                                   task_id, time.time(), lambda a: _kill_agents(a, marker))


@task_postrun.connect
def _task_over(task_id: str = "", **_: Any) -> None:
    done = _running.pop(task_id, None)
    if done is not None:
        done.set()


_running: dict[str, threading.Event] = {}


def _kill_after_start_counted(job_id: str, shard: str) -> None:
    """Kill this process once the task has counted its start (so the attempt cap can act)."""
    from pipeline.jobs.broker import connect
    from pipeline.settings import get_settings

    r = connect(check=False)
    key = f"ff:job:{job_id}:attempts"
    before = int(r.hget(key, shard) or 0)
    if before >= get_settings().max_attempts:
        return  # this start is refused as a poison shard: it does no work to die in

    def watch() -> None:
        while int(r.hget(key, shard) or 0) <= before:
            time.sleep(0.005)
        _kill_self()

    threading.Thread(target=watch, daemon=True, name="chaos").start()


def _live_children(parent: int, program: bytes) -> list[int]:
    """Running (not zombie) children of ``parent`` whose command line names ``program``."""
    found = []
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (child / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z" and program in cmd:
            found.append(int(child.name))
    return found


def _agents() -> list[int]:
    """This process's torchrun children (each its own session; its ranks in their own)."""
    return _live_children(os.getpid(), b"torch.distributed.run")


RANKS = b"pipeline.jobs.ranks"


def _kill_agents(agents: list[int], marker: Path) -> None:
    """SIGKILL the agents alone (each its own session; their ranks are in sessions of their
    own, so nothing here kills them), then record in ``marker`` which of their ranks were
    still running when the node task started torchrun again (``alive``; the test reads it):
    none, as ``launch.die_with_agent`` makes them die with their agent (without it an
    orphaned rank ran on for about 10 s, beside the relaunched one)."""
    ranks = [r for a in agents for r in _live_children(a, RANKS)]
    for pid in agents:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    t0 = time.monotonic()
    alive, relaunched = ranks, False
    while alive and not relaunched and time.monotonic() < t0 + 60:
        time.sleep(0.02)
        relaunched = any(a not in agents for a in _agents())  # (checked before the ranks)
        alive = [r for r in ranks if _rank_runs(r)]
    marker.write_text(json.dumps({"agents": agents, "ranks": ranks, "alive": alive,
                                  "relaunched_first": relaunched,
                                  "seconds": round(time.monotonic() - t0, 3)}))


def _rank_runs(rank: int) -> bool:
    """The rank still runs (an orphan's parent is no longer its agent: asked by pid)."""
    try:
        state = Path(f"/proc/{rank}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and RANKS in Path(f"/proc/{rank}/cmdline").read_bytes()
    except OSError:
        return False


def _once_after_checkpoint(checkpoint: Path, marker: Path, task_id: str, after: float,
                           kill: Callable[[list[int]], None]) -> None:
    """While this task runs: as soon as a checkpoint written after ``after`` (so not an
    earlier slice's) exists *and* this process has a live torchrun agent, claim ``marker``
    (one kill per job, whichever delivery gets there) and ``kill(agents)``.

    Deterministic on a loaded machine: the kill is not one attempt at the instant the
    checkpoint appears (the agent may be gone by then, or this delivery may not be the one
    running torchrun) but holds until a live agent is found, for as long as the task runs."""
    done = _running[task_id] = threading.Event()

    def written() -> bool:
        try:
            return checkpoint.stat().st_mtime >= after
        except OSError:
            return False

    def watch() -> None:
        while not done.is_set():
            agents = _agents() if written() else []
            if agents:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return  # another delivery made the job's one kill
                os.close(fd)
                kill(agents)
                return
            done.wait(0.005)

    threading.Thread(target=watch, daemon=True, name="chaos").start()
