"""Nodes of a data-parallel run meet through Redis before torchrun's rendezvous.

Each node task registers itself; the first to register serves the c10d store and publishes
its address; every node waits until all have joined (so a run that cannot gather its nodes
says so at once instead of timing out inside torchrun), and learns how many ranks share its
machine (they share its cores on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import JobCancelled, JobError
from pipeline.jobs.records import FINAL, JOB_TTL_S, JobStore, job_key

ADDRESS_ENV = "FEATUREFLEET_NODE_ADDRESS"  # the address other nodes reach this one at


@dataclass(frozen=True)
class Meeting:
    endpoint: str
    is_host: bool
    ranks_here: int
    run_id: str
    address: str  # this node's, as the others reach it


def my_address(r: Any = None) -> str:
    """This node's address as the other nodes reach it: $FEATUREFLEET_NODE_ADDRESS, else the
    address of the interface that reaches the broker (every node reaches it, so the hosts
    share that network), else the host name's address."""
    configured = os.environ.get(ADDRESS_ENV)
    if configured:
        return configured
    kw = getattr(getattr(r, "connection_pool", None), "connection_kwargs", {}) or {}
    if kw.get("host"):
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET,
                                                         socket.SOCK_DGRAM) as s:
            s.connect((str(kw["host"]), int(kw.get("port") or 6379)))  # no packet is sent
            return str(s.getsockname()[0])
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (gloo and NCCL bind their
    sockets to it), or None."""
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET,
                                                         socket.SOCK_DGRAM) as s:
            req = struct.pack("256s", name.encode()[:15])
            got = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
            if socket.inet_ntoa(got[20:24]) == address:
                return name
    return None


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
    address = my_address(jobs.r)
    host = socket.gethostname()
    pipe = jobs.r.pipeline()
    pipe.hset(key + ":nodes", str(slot), json.dumps({"host": host, "nproc": nproc}))
    pipe.expire(key + ":nodes", JOB_TTL_S)
    pipe.execute()
    endpoint = f"{address}:{free_port(address)}"
    is_host = bool(jobs.r.set(key + ":endpoint", endpoint, nx=True, ex=JOB_TTL_S))
    deadline = time.monotonic() + timeout_s
    shown = -1
    while True:
        nodes = jobs.r.hgetall(key + ":nodes")
        if len(nodes) >= nnodes:
            break
        status = jobs.field(job_id, "status")
        if status in FINAL:  # a node that failed waiting failed the job: stop at once
            raise JobCancelled(f"job {job_id} is {status}: node {slot} stops waiting")
        if len(nodes) != shown:  # the reason is visible in featurefleet status
            shown = len(nodes)
            jobs.update(job_id, stage=f"{program}: waiting for nodes ({shown} of {nnodes} "
                        "joined)")
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id}: {len(nodes)} of {nnodes} nodes joined the {program} "
                           f"run in {timeout_s:.0f} s; fix: start more workers on the GPU queue "
                           f"(ff.extract), or lower {program}.nodes")
        time.sleep(0.2)
    endpoint = str(jobs.r.get(key + ":endpoint"))
    here = sum(int(json.loads(v)["nproc"]) for v in nodes.values()
               if json.loads(v)["host"] == host)
    return Meeting(endpoint=endpoint, is_host=is_host, ranks_here=here,
                   run_id=f"{job_id}-{program}-{part}", address=address)
