"""One node of a data-parallel run: torchrun (``torch.distributed.run``) in a subprocess.

A Celery prefork child may not fork multiprocessing workers, but it may start a program: each
node of a run is one such task starting one torchrun, which starts ``nproc`` ranks on this
machine and meets the other nodes at a c10d rendezvous. torchrun restarts every rank when one
fails (``max_restarts``): the program resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Node:
    """How this node joins its run."""

    nnodes: int  # nodes in the run (tasks, usually machines or GPU worker processes)
    nproc: int  # ranks on this node (its GPUs; 1 on CPU)
    endpoint: str  # host:port of the c10d rendezvous store
    is_host: bool  # this node serves the store
    run_id: str  # the rendezvous id: one per run and time slice
    max_restarts: int = 3
    join_timeout_s: float = 600.0
    local_addr: str | None = None  # the address the other nodes reach this one at
    env: dict[str, str] = field(default_factory=dict)


def argv(node: Node, module: str, *args: str) -> list[str]:
    """torchrun's command line for ``python -m module args...`` on this node."""
    conf = f"is_host={1 if node.is_host else 0},join_timeout={int(node.join_timeout_s)}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={node.nnodes}",
            f"--nproc-per-node={node.nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={node.endpoint}", f"--rdzv-id={node.run_id}",
            f"--rdzv-conf={conf}", f"--max-restarts={node.max_restarts}",
            *([f"--local-addr={node.local_addr}"] if node.local_addr else []),
            "--monitor-interval=0.5", "-m", module, *args]


PR_SET_PDEATHSIG = 1


def _on_parent_death(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux; elsewhere
    nothing)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (the task's process) dies; torchrun
    then stops its ranks, and the redelivered task starts clean."""
    _on_parent_death(signal.SIGTERM)


def die_with_agent() -> None:
    """In a rank, first thing: SIGKILL when its torchrun agent dies (Linux). torchrun starts
    every rank in a session of its own, so an agent killed outright (``kill -9``, the OOM
    killer) used to leave its ranks running: the node task's relaunched ranks then raced
    the orphans for the same checkpoint and outcome files (and, on a GPU, its memory).
    A rank whose agent is already gone exits at once."""
    parent = os.getppid()
    _on_parent_death(signal.SIGKILL)
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


def supervise(cmd: list[str], env: dict[str, str], log: Path,
              should_stop: Callable[[], bool], poll_s: float = 1.0,
              grace_s: float = 30.0) -> int:
    """Run ``cmd`` to its end and return its exit status; when ``should_stop()`` turns true
    (the job was cancelled) stop it (SIGTERM to its process group, then SIGKILL) and return
    -1."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            if should_stop():
                stop(proc, grace_s)
                return -1
        return int(proc.returncode)
    finally:
        if proc.poll() is None:  # an exception here (a Ctrl-C, a lost Redis): take it down
            stop(proc, grace_s)


def stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def log_tail(log: Path, lines: int = 12) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [ln for ln in text if ln.strip()][-lines:]
    return " | ".join(ln.strip()[:200] for ln in keep)
