"""Fault tests: real worker processes are killed, Redis restarts, tasks fail, jobs are cancelled.
Each test runs its own private Redis and workers and is bounded in time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import submit
from pipeline.client.api import Job
from pipeline.errors import BrokerError, JobError
from pipeline.jobs.broker import connect
from pipeline.jobs.records import JobStore
from pipeline.store.files import sha256_of as file_sha256
from pipeline.store.shards import read_shard
from tests.conftest import CHAOS, small_spec
from workers.launcher import LocalCluster, start_redis, start_worker, wait_for_workers

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{p}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
    return out


@contextlib.contextmanager
def cluster_env(tmp: Path, extract_workers: int = 1,
                env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """A private cluster whose workers have ``env`` and load the chaos plugin."""
    c = LocalCluster(tmp / "cluster", extract_workers=extract_workers, env=env or {},
                     include=[CHAOS])
    try:
        yield c.start()
    finally:
        c.stop()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def busiest(procs: list) -> object:  # type: ignore[type-arg]
    """The worker whose pool child burns the most CPU over half a second."""
    kids = [children(p.popen.pid) for p in procs]
    before = [sum(cpu_ticks(k) for k in ks) for ks in kids]
    time.sleep(0.5)
    gain = [sum(cpu_ticks(k) for k in ks) - b for ks, b in zip(kids, before, strict=True)]
    return procs[gain.index(max(gain))]


def wait_for(cond, timeout: float = 120, every: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def assert_exactly_once(job: Job) -> dict:
    st = job.status()
    rep = job.result()
    ids = [s["id"] for s in rep["shards"]]
    assert len(ids) == len(set(ids)) == st["shards_total"]
    for s in rep["shards"]:
        assert file_sha256(s["path"]) == s["sha256"]
        assert read_shard(s["path"]).features.shape[0] == s["rows"]
    assert st["shards_done"] == st["shards_total"]
    assert st["images_done"] == st["images_total"]
    assert st["collect_runs"] == 1  # the chord callback ran once
    assert not list(Path(rep["feature_store"]["dir"]).glob("*.tmp"))
    return rep


def test_1_sigkill_of_the_pool_child_mid_shard(tmp_path: Path) -> None:
    with cluster_env(tmp_path) as c:
        spec = small_spec(tmp_path, limit=300, shard_size=100).replace(
            backbone={"image_size": 96})
        job = submit(spec, broker=c.broker)
        wait_for(lambda: job.status().get("images_done", 0) > 0)
        kids = children(c.procs[0].popen.pid)  # the extraction worker's pool child
        assert len(kids) == 1
        os.kill(kids[0], signal.SIGKILL)
        st = job.wait(timeout=300)
        assert st["status"] == "SUCCESS", st
        assert_exactly_once(job)


def test_2_whole_worker_lost_while_another_lives(tmp_path: Path) -> None:
    # A short visibility timeout (30 s) brings the lost shard back in under a minute (the
    # timeout plus kombu's restore sweep). Time limits stay at their default: a loaded machine
    # slows every task, and no task may be cut short for it.
    with cluster_env(tmp_path, extract_workers=2,
                     env={"FEATUREFLEET_VISIBILITY_TIMEOUT": "30"}) as c:
        spec = small_spec(tmp_path, limit=400, shard_size=100).replace(
            backbone={"image_size": 160})  # shards of ~2 s each
        job = submit(spec, broker=c.broker)
        wait_for(lambda: job.status().get("images_done", 0) > 0)
        victim = busiest(c.procs[:2])  # the extraction worker that is running a shard now
        os.killpg(victim.popen.pid, signal.SIGKILL)  # host lost: parent and child at once
        victim.popen.wait(10)
        st = job.wait(timeout=300)
        assert st["status"] == "SUCCESS", st
        assert_exactly_once(job)
        attempts = connect(c.broker).hgetall(f"ff:job:{job.id}:attempts")
    assert max(int(v) for v in attempts.values()) >= 2  # the lost shard was delivered again


def test_8_sigterm_hands_the_running_shard_back(tmp_path: Path) -> None:
    # Soft shutdown of 1 s: the stopping worker gives its shard back at once instead of holding
    # it until the visibility timeout (2 h here): the other worker finishes the job.
    with cluster_env(tmp_path, extract_workers=2,
                     env={"FEATUREFLEET_SOFT_SHUTDOWN_S": "1"}) as c:
        # shards of several seconds each, so the SIGTERM lands while one is running
        spec = small_spec(tmp_path, limit=600, shard_size=300).replace(
            backbone={"image_size": 224})
        job = submit(spec, broker=c.broker)
        wait_for(lambda: job.status().get("images_done", 0) > 0)
        victim = busiest(c.procs[:2])
        os.kill(victim.popen.pid, signal.SIGTERM)  # what docker stop / kubectl delete send
        victim.popen.wait(60)
        st = job.wait(timeout=240)
        assert st["status"] == "SUCCESS", st
        assert_exactly_once(job)
        attempts = connect(c.broker).hgetall(f"ff:job:{job.id}:attempts")
    assert max(int(v) for v in attempts.values()) >= 2


def test_4_poison_shard_fails_after_k_attempts(tmp_path: Path) -> None:
    with cluster_env(tmp_path, env={"CHAOS_CRASH_SHARD": "64-128",
                                    "FEATUREFLEET_MAX_ATTEMPTS": "2"}) as c:
        job = submit(small_spec(tmp_path), broker=c.broker)
        st = job.wait(timeout=300)
        attempts = connect(c.broker).hget(f"ff:job:{job.id}:attempts", "64-128")
    assert st["status"] == "FAILED"
    assert "shard 64-128" in st["error"] and "poison shard" in st["error"]
    assert int(attempts) == 3  # two starts killed their worker; the third refused to run
    # The shards that were finished are kept, with their writers' checksums: running the job
    # again (the crash fixed) extracts only the missing one, though the failed job never
    # wrote its set's manifest.
    kept = list((Path(st["job_dir"]).parent.parent / "store").rglob("*.h5"))
    assert len(kept) == 4
    with cluster_env(tmp_path / "again") as c:
        again = submit(small_spec(tmp_path), broker=c.broker)
        st2 = again.wait(timeout=300)
    assert st2["status"] == "SUCCESS" and st2["shards_cached"] == 4


def test_5_error_in_the_chord_header_names_the_shard(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(8):
            p = root / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (30 * i, 100 * (cls == "b"), 0)).save(p)
    # every shard task waits 1 s before it decodes: the change below lands before any does
    with cluster_env(tmp_path, env={"CHAOS_SLOW_SHARD_S": "1"}) as c:
        spec = small_spec(tmp_path).from_dict({
            "data": {"source": "imagefolder", "path": str(root), "shard_size": 4},
            "backbone": {"image_size": 32}, "output": str(tmp_path / "out")})
        job = submit(spec, broker=c.broker)
        Image.new("RGB", (20, 20)).save(root / "a" / "0.png")  # data changes under the job
        st = job.wait(timeout=300)
        time.sleep(2)  # a second errback call would land now
        st = job.status()
        with pytest.raises(JobError, match="FAILED"):
            job.result()
        again = job.retry()  # the same spec on today's data: planned anew, shards reused
        assert again.wait(timeout=300)["status"] == "SUCCESS", again.status().get("error")
        assert again.status()["retry_of"] == job.id
    assert st["status"] == "FAILED"
    import re

    assert re.search(r"shard \d+-\d+: 1 sample\(s\) changed", st["error"]), st["error"]
    assert "changed since the job was planned" in st["error"] and "a/0.png" in st["error"]
    assert st["errback_runs"] == 1


def test_6_finished_shard_delivered_again_changes_nothing(tmp_path: Path) -> None:
    from workers.app import make_app

    with cluster_env(tmp_path) as c:
        job = submit(small_spec(tmp_path, limit=150), broker=c.broker)
        assert job.wait(timeout=300)["status"] == "SUCCESS"
        before = job.status()
        rep = job.result()
        plan = json.loads((Path(before["job_dir"]) / "plan.json").read_text())
        shard = plan["shards"][0]
        sha = file_sha256(shard["path"])
        app = make_app(c.broker)
        try:  # the same message again, as a redelivery would bring it
            res = app.send_task("featurefleet.extract_shard",
                                args=(before["plan"], f"{shard['start']}-{shard['end']}"),
                                queue="ff.extract")
            again = res.get(timeout=60)
        finally:
            app.close()
        after = job.status()
        rep2 = job.result()
    assert again is None and sha == file_sha256(shard["path"])  # the result is in the record
    for k in ("shards_done", "images_done", "images_skipped", "collect_runs"):
        assert after[k] == before[k], k
    assert [s["sha256"] for s in rep["shards"]] == [s["sha256"] for s in rep2["shards"]]


def test_7_cancel_during_extraction(tmp_path: Path) -> None:
    with cluster_env(tmp_path) as c:
        spec = small_spec(tmp_path, limit=400, shard_size=100).replace(
            backbone={"image_size": 224})  # shards of ~1 s each
        job = submit(spec, broker=c.broker)
        wait_for(lambda: job.status().get("shards_done", 0) >= 1, timeout=180)
        assert job.cancel()
        assert not job.cancel()  # once
        time.sleep(6)  # the running shard notices at its next batch; queued ones are revoked
        st = job.status()
        store = Path(st["job_dir"]).parent.parent / "store"
        files = list(store.rglob("*.h5"))
    assert st["status"] == "CANCELLED"
    assert not list(store.rglob("*.tmp"))
    assert 1 <= len(files) < st["shards_total"]
    for f in files:  # what was finished stays valid
        read_shard(f)


def test_3_redis_restart_with_aof(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "redis", appendonly=True)
    port, password = redis.port, redis.password
    logs = tmp_path / "logs"
    procs = [start_worker(redis.url, ["ff.extract"], "x1@test", logs),
             start_worker(redis.url, ["ff.train"], "t1@test", logs)]
    try:
        wait_for_workers(redis.url, ["x1@test", "t1@test"], procs)
        spec = small_spec(tmp_path, limit=300, shard_size=50).replace(
            backbone={"image_size": 64})
        job = submit(spec, broker=redis.url)
        wait_for(lambda: job.status().get("shards_done", 0) >= 1, timeout=180)
        redis.stop()
        time.sleep(1)
        redis = start_redis(tmp_path / "redis", port=port, password=password, appendonly=True)

        def done() -> bool:
            with contextlib.suppress(BrokerError):
                return job.status()["status"] in ("SUCCESS", "FAILED")
            return False

        wait_for(done, timeout=300, every=0.5)
        assert job.status()["status"] == "SUCCESS", job.status()
        assert_exactly_once(job)
    finally:
        for p in procs:
            p.stop(timeout=10)
        redis.stop()


def test_3b_a_message_held_when_redis_stops_comes_back_with_the_next_connection(
        tmp_path: Path) -> None:
    """The instant test 3 can hit: a consumer holds a message it has not acknowledged when
    Redis stops, so kombu cannot put it back as the connection closes. The next connection
    of the process puts it back at once (not after the visibility timeout, an hour here)."""
    import redis as redis_py
    from kombu import Connection

    from workers import transport

    redis = start_redis(tmp_path / "redis", appendonly=True)
    port, password = redis.port, redis.password
    opts = {"visibility_timeout": 3600}
    conn = Connection(redis.url, transport="workers.transport:Transport",
                      transport_options=opts)
    try:
        queue = conn.SimpleQueue("ff.test-held")
        queue.put({"shard": "50-100"})
        assert queue.get(timeout=5).payload == {"shard": "50-100"}  # held, not acknowledged
        redis.stop()  # (graceful: the AOF has the message in the unacked index)
        with contextlib.suppress(Exception):
            conn.close()  # kombu tries to put it back: Redis is away
        assert len(transport._LEFT_BEHIND) == 1
        redis = start_redis(tmp_path / "redis", port=port, password=password,
                            appendonly=True)
        again = Connection(redis.url, transport="workers.transport:Transport",
                           transport_options=opts)
        try:
            msg = again.SimpleQueue("ff.test-held").get(timeout=5)
            assert msg.payload == {"shard": "50-100"}
            assert not transport._LEFT_BEHIND
            msg.ack()
            client = redis_py.Redis(port=port, password=password)
            assert client.hlen("unacked") == 0 and client.llen("ff.test-held") == 0
        finally:
            again.close()
    finally:
        transport._LEFT_BEHIND.clear()
        redis.stop()


def test_9_redis_restarted_without_its_data(tmp_path: Path) -> None:
    """The job record and the queues are gone; the plan and the finished shards are not.
    Clients say what happened, workers do not re-create a half record, and the watchdog
    brings the job back from its plan (finished shards reused)."""
    from pipeline.client import watchdog
    from pipeline.client.api import recover
    from pipeline.errors import JobError

    redis = start_redis(tmp_path / "redis")  # no AOF: a restart loses everything
    port, password = redis.port, redis.password
    logs = tmp_path / "logs"
    procs = [start_worker(redis.url, ["ff.extract"], "x1@lost", logs),
             start_worker(redis.url, ["ff.train"], "t1@lost", logs)]
    try:
        wait_for_workers(redis.url, ["x1@lost", "t1@lost"], procs)
        spec = small_spec(tmp_path, limit=300, shard_size=50).replace(
            backbone={"image_size": 96})
        job = submit(spec, broker=redis.url)
        wait_for(lambda: job.status().get("shards_done", 0) >= 2, timeout=180)
        job_dir = Path(job.status()["job_dir"])
        redis.stop()
        redis = start_redis(tmp_path / "redis", port=port, password=password)
        with pytest.raises(JobError, match=rf"no job '{job.id}'.*--job-dir"):
            job.status()  # says what happened and how to recover
        time.sleep(3)  # a running shard finishes now: its record is gone, it must not return
        r = connect(redis.url)
        assert r.hget(f"ff:job:{job.id}", "status") is None and not r.exists(f"ff:job:{job.id}")
        assert watchdog.recover_lost(JobStore(r), [job_dir.parent], redis.url) == [job.id]
        with pytest.raises(JobError, match="still has its record"):  # only lost jobs
            recover(job_dir, redis.url)
        st = job.wait(timeout=300)
        assert st["status"] == "SUCCESS" and st.get("recovered")
        rep = job.result()
        assert sum(1 for s in rep["shards"] if s["cached"]) >= 2  # finished before: reused
        for s in rep["shards"]:
            assert file_sha256(s["path"]) == s["sha256"]
        assert watchdog.recover_lost(JobStore(r), [job_dir.parent], redis.url) == []
    finally:
        for p in procs:
            p.stop(timeout=10)
        redis.stop()


def test_10_full_redis_is_ridden_out(tmp_path: Path) -> None:
    """Redis at maxmemory (noeviction) refuses writes: workers keep their messages and wait
    (they used to exit on the first refused ack); once memory is freed the job finishes."""
    import threading

    import redis as redis_py

    with cluster_env(tmp_path) as c:
        r = connect(c.broker)
        spec = small_spec(tmp_path, limit=300, shard_size=50).replace(
            backbone={"image_size": 96})
        job = submit(spec, broker=c.broker)
        wait_for(lambda: job.status().get("shards_done", 0) >= 1, timeout=180)
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 100_000)
        stop, refused = threading.Event(), [0]

        def fill() -> None:  # keep Redis full: every freed byte is taken again
            i = 0
            while not stop.is_set():
                try:
                    r.set(f"junk:{i}", "x" * 2000)
                    i += 1
                except redis_py.exceptions.OutOfMemoryError:
                    refused[0] += 1
                    time.sleep(0.01)

        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        try:
            time.sleep(12)
            assert refused[0] > 100  # Redis was full all along
            assert all(p.alive() for p in c.procs)  # nobody exited
            assert r.hget(f"ff:job:{job.id}", "status") == '"RUNNING"'
        finally:
            stop.set()
            filler.join()
            r.config_set("maxmemory", 0)
            for key in r.scan_iter("junk:*", count=1000):
                r.delete(key)
        st = job.wait(timeout=180)
        assert st["status"] == "SUCCESS", st
        assert_exactly_once(job)
