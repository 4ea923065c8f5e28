"""One machine's worker processes: one extraction process per GPU (pinned with
CUDA_VISIBLE_DEVICES), CPU processes for training, a supervisor that stops them gracefully."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from pipeline.devices import visible_gpus as list_gpus
from pipeline.errors import FeaturefleetError
from workers.launcher import SHUTDOWN_GRACE_S, start_worker
from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE


def fleet_plan(gpus: str, cpu_workers: int, extract_workers: int,
               available: list[str]) -> list[tuple[str, list[str], dict[str, str]]]:
    """(node name prefix, queues, extra env) for each worker process of a machine.

    Raises:
        FeaturefleetError: a requested GPU does not exist.
    """
    wanted = available if gpus == "all" else [g.strip() for g in gpus.split(",") if g.strip()]
    missing = [g for g in wanted if g not in available]
    if missing:
        raise FeaturefleetError(f"GPU(s) {','.join(missing)} not found (this machine has "
                                f"{','.join(available) or 'none'}); fix: use --gpus all or "
                                "existing indices")
    procs: list[tuple[str, list[str], dict[str, str]]] = []
    if wanted:
        for g in wanted:
            procs.append((f"gpu{g}", [EXTRACT_QUEUE], {"CUDA_VISIBLE_DEVICES": g}))
    else:  # no GPU: CPU extraction workers share the cores
        for i in range(extract_workers):
            procs.append((f"extract{i + 1}", [EXTRACT_QUEUE], {"CUDA_VISIBLE_DEVICES": ""}))
    for i in range(cpu_workers):
        procs.append((f"cpu{i + 1}", [TRAIN_QUEUE], {"CUDA_VISIBLE_DEVICES": ""}))
    return procs


def run_fleet(broker: str, gpus: str, cpu_workers: int, extract_workers: int,
              loglevel: str = "INFO", logdir: Path | None = None) -> int:
    """Run this machine's worker processes until SIGTERM/SIGINT, then stop them gracefully.

    Each process is a separate Celery worker with a unique node name; the supervisor itself
    never touches CUDA.
    """
    host = socket.gethostname()
    logdir = logdir or Path(tempfile.mkdtemp(prefix="featurefleet-workers-"))
    plan = fleet_plan(gpus, cpu_workers, extract_workers, list_gpus())
    procs = [start_worker(broker, queues, f"{prefix}-{os.getpid()}@{host}", logdir,
                          env=env, loglevel=loglevel) for prefix, queues, env in plan]
    print(f"featurefleet: {len(procs)} worker processes ("
          + ", ".join(f"{p.name}: {','.join(q)}" for p, (_, q, _) in zip(procs, plan,
                                                                         strict=True))
          + f"); logs in {logdir}", flush=True)
    stop = {"now": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop["now"] and all(p.alive() for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:  # warm shutdown: each finishes or hands back its task
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        for p in procs:
            p.stop(timeout=SHUTDOWN_GRACE_S)
    dead = [p for p in procs if p.popen.returncode not in (0, -signal.SIGTERM)]
    return 1 if dead and not stop["now"] else 0
