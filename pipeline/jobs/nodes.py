"""Nodes of a data-parallel run meet through Redis before torchrun's rendezvous.

Each node task registers itself; the first to register serves the c10d store and publishes
its address; every node waits until all have joined (so a run that cannot gather its nodes
says so at once instead of timing out inside torchrun), and learns how many ranks share its
machine (they share its cores on CPU).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from pipeline.errors import JobError
from pipeline.jobs.records import JOB_TTL_S, JobStore, job_key

ADDRESS_ENV = "FEATUREFLEET_NODE_ADDRESS"  # the address other nodes reach this one at


@dataclass(frozen=True)
class Meeting:
    endpoint: str
    is_host: bool
    ranks_here: int
    run_id: str


def my_address() -> str:
    """This node's address: $FEATUREFLEET_NODE_ADDRESS, else the host name's address."""
    configured = os.environ.get(ADDRESS_ENV)
    if configured:
        return configured
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address if address not in ("localhost",) else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def meet(jobs: JobStore, job_id: str, program: str, part: int, slot: int, nnodes: int,
         nproc: int, timeout_s: float = 300.0) -> Meeting:
    """Join the run's meeting as ``slot``; return where the c10d store is.

    Raises:
        JobError: not every node joined within ``timeout_s``.
    """
    key = f"{job_key(job_id)}:meet:{program}:{part}"
    address = my_address()
    host = socket.gethostname()
    pipe = jobs.r.pipeline()
    pipe.hset(key + ":nodes", str(slot), json.dumps({"host": host, "nproc": nproc}))
    pipe.expire(key + ":nodes", JOB_TTL_S)
    pipe.execute()
    endpoint = f"{address}:{free_port(address)}"
    is_host = bool(jobs.r.set(key + ":endpoint", endpoint, nx=True, ex=JOB_TTL_S))
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = jobs.r.hgetall(key + ":nodes")
        if len(nodes) >= nnodes:
            break
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id}: {len(nodes)} of {nnodes} nodes joined the {program} "
                           f"run in {timeout_s:.0f} s; fix: start more workers on the GPU queue "
                           f"(ff.extract), or lower {program}.nodes")
        time.sleep(0.2)
    endpoint = str(jobs.r.get(key + ":endpoint"))
    here = sum(int(json.loads(v)["nproc"]) for v in nodes.values()
               if json.loads(v)["host"] == host)
    return Meeting(endpoint=endpoint, is_host=is_host, ranks_here=here,
                   run_id=f"{job_id}-{program}-{part}")
