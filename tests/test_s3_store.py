"""A whole job with its feature store in S3: a real moto S3 server process, real workers.
Shards are staged locally and uploaded as whole objects; training and evaluation stream them
back; a second run reuses them from the bucket."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import submit
from tests.conftest import small_spec
from tests.test_faults import cluster_env

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def s3_server(tmp: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp / "moto.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline and proc.poll() is None, "moto did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_job_with_s3_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    with s3_server(tmp_path) as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        for k, v in env.items():  # the client plans (reads the bucket); workers write
            monkeypatch.setenv(k, v)
        fs = s3fs.S3FileSystem(key="test", secret="test", endpoint_url=endpoint)
        fs.mkdir("ff-bucket")
        spec = small_spec(tmp_path / "out").replace(store="s3://ff-bucket/store")
        with cluster_env(tmp_path, env=env) as c:
            first = submit(spec, broker=c.broker)
            st = first.wait(timeout=300)
            assert st["status"] == "SUCCESS", st.get("error")
            rep = first.result()
            again = submit(spec, broker=c.broker)
            st2 = again.wait(timeout=300)
            assert st2["status"] == "SUCCESS", st2.get("error")
            rep2 = again.result()
        shard_dir = rep["feature_store"]["dir"]
        assert shard_dir.startswith("s3://ff-bucket/store/efficientnet_lite0/")
        objects = {Path(p).name: fs.info(p)["size"] for p in fs.ls(shard_dir)}
        assert "manifest.json" in objects
        assert len(rep["shards"]) >= 4
        for s in rep["shards"]:
            assert s["path"].startswith(shard_dir) and objects[Path(s["path"]).name] > 0
            with fs.open(s["path"], "rb") as fh:
                import hashlib

                assert hashlib.sha256(fh.read()).hexdigest() == s["sha256"]
        assert not any(n.endswith(".tmp") for n in objects)
        assert not (tmp_path / "out" / "store").exists()  # nothing stored locally
        assert rep["metrics"]["samples"] == rep["data"]["split_sizes"]["test"]
        # the second job found every shard in the bucket (checksums match the manifest)
        assert all(s["cached"] for s in rep2["shards"])
        assert rep2["metrics"]["top1"] == pytest.approx(rep["metrics"]["top1"])


def test_unreachable_s3_store_is_a_clear_error(cluster, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import StoreError

    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    spec = small_spec(tmp_path / "out").replace(store="s3://nowhere/store")
    with pytest.raises(StoreError, match=r"s3://nowhere/store.*fix:"):
        submit(spec, broker=cluster.broker)
    jobs = tmp_path / "out" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())  # nothing written


def test_cache_commands_name_their_limit_on_a_bucket() -> None:
    from pipeline.errors import StoreError
    from pipeline.store import cache

    for call in (lambda: cache.ls("s3://b/x"), lambda: cache.verify("s3://b/x"),
                 lambda: cache.rm("s3://b/x", everything=True)):
        with pytest.raises(StoreError, match=r"local stores.*s3://b/x.*fix:"):
            call()
