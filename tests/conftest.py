"""Shared fixtures: a real redis-server and real Celery worker processes, started per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.spec import BackboneSpec, DataSpec, JobSpec
from workers.runtime import LocalCluster

ARTIFACTS = Path(os.environ.get("FEATUREFLEET_TEST_ARTIFACTS", "test-artifacts")).resolve()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A private redis-server + one extraction and one training worker process."""
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), extract_workers=1)
    try:
        yield c.start()
    finally:
        c.stop()


def small_spec(out: Path, **data: object) -> JobSpec:
    """A fast real job: a stratified subset of digits at 32 px through EfficientNet-Lite0."""
    d = {"source": "digits", "limit": 300, "shard_size": 64, **data}
    return JobSpec(name="test-digits", data=DataSpec(**d),  # type: ignore[arg-type]
                   backbone=BackboneSpec(name="efficientnet_lite0", image_size=32),
                   output=str(out), store=str(out / "store")).validate()


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
