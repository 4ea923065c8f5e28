"""Shared fixtures: real redis-server processes and real Celery worker processes.

``redis_url`` is one private redis-server for the whole session (unit tests of the job
records and their Lua scripts); ``cluster`` adds one extraction and one training worker
process (integration tests). Fault tests start their own clusters.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep instead of spinning (before anything loads torch): the suite
# runs test files in parallel processes, each with worker processes, on a few cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.spec import JobSpec
from workers.launcher import LocalCluster, RedisServer, start_redis

ARTIFACTS = Path(os.environ.get("FEATUREFLEET_TEST_ARTIFACTS", "test-artifacts")).resolve()
CHAOS = "tests.chaos"  # the test-only worker plugin that injects faults


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def jobs(redis_server: RedisServer) -> Any:
    """A JobStore on the shared Redis, emptied for each test."""
    from pipeline.jobs.broker import connect
    from pipeline.jobs.records import JobStore

    client = connect(redis_server.url)
    client.flushdb()
    return JobStore(client)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A private redis-server + one extraction and one training worker process."""
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), extract_workers=1)
    try:
        yield c.start()
    finally:
        c.stop()


def small_spec(out: Path, **data: Any) -> JobSpec:
    """A fast real job: a stratified subset of digits at 32 px through EfficientNet-Lite0
    (without the data-quality stage, which tests/test_quality.py runs: ``.replace(quality=
    {"enabled": True})`` turns it back on)."""
    d = {"source": "digits", "limit": 300, "shard_size": 64, **data}
    return JobSpec.from_dict({"name": "test-digits", "data": d,
                              "quality": {"enabled": False},
                              "backbone": {"name": "efficientnet_lite0", "image_size": 32},
                              "output": str(out), "store": str(out / "store")})


def processes_marked(marker: str) -> list[tuple[int, str]]:
    """Live processes whose command line or environment mentions ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.split(") ")[-1].startswith("Z"):
            continue  # a zombie is already dead
        if marker in cmd or marker in env:
            found.append((int(pid), cmd.strip()))
    return found


# `make test` runs the files in three processes (pytest-xdist, one file per process at a
# time): the longest files start first (longest-processing-time-first), so the processes
# finish together instead of one starting the 3-minute host tests last. Seconds measured in
# a sequential run; the other files follow in collection order.
LONGEST_FIRST = ["test_faults.py", "test_hosts.py", "test_pretrain.py", "test_finetune.py",
                 "test_cli.py", "test_text.py", "test_audio.py", "test_integrity.py",
                 "test_security.py", "test_fastpath.py", "test_s3_store.py", "test_wiring.py",
                 "test_batch.py", "test_integration.py", "test_quality.py", "test_engine.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
