"""Nodes of a data-parallel run meet through Redis before torchrun's rendezvous.

Each node task registers itself; the first to register serves the c10d store and publishes
its address (the one that reaches the broker, so the other hosts reach it too); every node
waits until all have joined (so a run that cannot gather its nodes says so at once instead of
timing out inside torchrun), and learns how many ranks share its machine (they share its
cores on CPU). A meeting has a generation: when a node is lost (its task delivered again) or
its torchrun fails, the run regroups (:func:`regroup`): every node stops its torchrun and
meets again in the next generation, with a new store host and run id.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import JobCancelled, JobError
from pipeline.jobs.records import FINAL, JOB_TTL_S, JobStore, job_key
from pipeline.settings import get_settings


@dataclass(frozen=True)
class Meeting:
    endpoint: str
    is_host: bool
    ranks_here: int
    run_id: str
    address: str  # this node's, as the others reach it
    gen: int = 0  # the meeting's generation (one per regroup of the run)


def my_address(r: Any = None) -> str:
    """This node's address as the other nodes reach it: $FEATUREFLEET_NODE_ADDRESS, else the
    address of the interface that reaches the broker (every node reaches it, so the hosts
    share that network), else the host name's address."""
    configured = get_settings().node_address
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


_BUMP = """
local c = tonumber(redis.call('get', KEYS[1]) or '0')
local mine = tonumber(ARGV[1])
if c <= mine then
  redis.call('set', KEYS[1], mine + 1, 'EX', tonumber(ARGV[2]))
  redis.call('rpush', KEYS[2], ARGV[3])
  redis.call('expire', KEYS[2], tonumber(ARGV[2]))
  return mine + 1
end
return c
"""


def generation_key(job_id: str, program: str, part: int) -> str:
    return f"{job_key(job_id)}:meet:{program}:{part}:gen"


def generation(jobs: JobStore, job_id: str, program: str, part: int) -> int:
    """The run's current meeting generation (0 until some node regrouped it)."""
    return int(jobs.r.get(generation_key(job_id, program, part)) or 0)


def regroup(jobs: JobStore, job_id: str, program: str, part: int, seen: int,
            why: str = "") -> int:
    """Start the next generation after ``seen`` (once, however many nodes ask): every node
    stops its torchrun and meets again there. The store-side round barrier of a multi-node
    run: no torchrun agent restarts ranks on its own, so no rank can meet a peer of an older
    round. ``why`` is kept in the run's regroup history (:func:`regroups`)."""
    key = generation_key(job_id, program, part)
    entry = json.dumps({"gen": seen + 1, "why": why, "at": round(time.time(), 1)})
    return int(jobs.r.eval(_BUMP, 2, key, key + ":why", seen, JOB_TTL_S, entry))


def regroups(jobs: JobStore, job_id: str, program: str, part: int) -> list[dict[str, Any]]:
    """Each generation's start: which node started it, why, when."""
    return [json.loads(e) for e in
            jobs.r.lrange(generation_key(job_id, program, part) + ":why", 0, -1)]


def meet(jobs: JobStore, job_id: str, program: str, part: int, slot: int, nnodes: int,
         nproc: int, timeout_s: float = 300.0, gen: int = 0,
         alive: Callable[[], bool] = lambda: True) -> Meeting:
    """Join the run's meeting (generation ``gen``) as ``slot``; return where the c10d store
    is. ``alive`` is called while waiting (a node task renews its lease with it).

    Raises:
        JobError: not every node joined within ``timeout_s``, or ``alive()`` turned false
            (another delivery of this node's task took over).
        JobCancelled: the job ended while waiting.
    """
    key = f"{job_key(job_id)}:meet:{program}:{part}:g{gen}"
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
        current = generation(jobs, job_id, program, part)
        if current > gen:  # regrouped again meanwhile: meet in the newer generation
            return meet(jobs, job_id, program, part, slot, nnodes, nproc, timeout_s, current,
                        alive)
        if not alive():
            raise JobError(f"job {job_id}: node {slot} of the {program} run was taken over by "
                           "another delivery of its task while it waited for its peers")
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
                   run_id=f"{job_id}-{program}-{part}-g{gen}", address=address, gen=gen)


_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  return redis.call('expire', KEYS[1], tonumber(ARGV[2]))
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 1
end
return 0
"""
_RELEASE = """
if ARGV[2] ~= '' then redis.call('set', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3])) end
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return 1
"""


class Lease:
    """The one live execution of a node task.

    Redis delivers a message again once it has been unacknowledged longer than the visibility
    timeout, even while its first delivery still runs (a node that waits for a lost peer does);
    and a lost host's task comes back the same way. The running execution holds a lease it
    renews every second; a second delivery that finds it alive steps aside (the task is retried
    later, freeing its worker for the tasks that must run meanwhile, e.g. the lost node's), and
    returns the holder's outcome once the holder finished, or takes over when the lease expired
    (its holder died with its host)."""

    TTL_S = 20

    def __init__(self, jobs: JobStore, job_id: str, name: str) -> None:
        self.r = jobs.r
        self.key = f"{job_key(job_id)}:lease:{name}"
        self.outcome_key = f"{job_key(job_id)}:outcome:{name}"
        self.token = os.urandom(8).hex()

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.token, nx=True, ex=self.TTL_S))

    def renew(self) -> bool:
        """Extend the lease (taking it again if it lapsed while nobody else took it); False
        when another execution holds it now."""
        return bool(self.r.eval(_RENEW, 1, self.key, self.token, self.TTL_S))

    def release(self, outcome: dict[str, Any] | None = None) -> None:
        """Give the lease up, leaving ``outcome`` for a follower."""
        self.r.eval(_RELEASE, 2, self.key, self.outcome_key, self.token,
                    json.dumps(outcome) if outcome is not None else "", JOB_TTL_S)

    def check(self) -> tuple[str, dict[str, Any] | None]:
        """A delivery's first question, without waiting: ``("done", outcome)`` when some
        execution of this node finished (whichever delivery it was, before or after this one
        arrived), ``("mine", None)`` when this execution now holds the lease (it was free:
        the first delivery, or the holder died), ``("busy", None)`` while another execution
        holds it."""
        for _ in range(2):
            done = self.r.get(self.outcome_key)
            if done is not None:
                return "done", dict(json.loads(done))
            if not self.acquire():
                return "busy", None
            if self.r.get(self.outcome_key) is None:
                return "mine", None
            self.release()  # the holder finished between the two reads: take its outcome
        return "busy", None
