"""Chain/chord wiring with real worker processes: cancel revokes every round's tasks, a chord
body that runs before its header's results landed is retried, and every head and strategy
sees the plan's sample ids (skipped images included)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline import submit
from pipeline.client import watchdog
from pipeline.client.api import Job, record_fields
from pipeline.jobs import steps
from pipeline.jobs.broker import connect
from pipeline.jobs.records import JobStore
from pipeline.planner import make_plan
from pipeline.spec import JobSpec
from tests.conftest import small_spec
from workers.app import make_app
from workers.launcher import LocalCluster, start_redis, start_worker, wait_for_workers

pytestmark = pytest.mark.integration


def test_cancel_revokes_the_tasks_of_every_round(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "redis")
    idle = start_worker(redis.url, ["ff.idle"], "idle@wiring", tmp_path / "logs")
    try:
        wait_for_workers(redis.url, ["idle@wiring"], [idle])
        jobs = JobStore(connect(redis.url))
        job = submit(small_spec(tmp_path, limit=150), broker=redis.url)  # nobody consumes it
        first = set(job.status()["task_ids"])
        jobs.r.delete("ff.extract")  # its messages are lost
        assert watchdog.check_job(jobs, job.id, redis.url, stall_s=0) == "redispatched"
        ids = set(job.status()["task_ids"])
        assert first < ids and {i for i in ids - first if i.endswith(".r1")} == ids - first
        assert job.cancel()
        app = make_app(redis.url)
        try:
            deadline = time.monotonic() + 30
            revoked: set[str] = set()
            while not ids <= revoked and time.monotonic() < deadline:
                replies = app.control.inspect(timeout=2).revoked() or {}
                revoked = {i for got in replies.values() for i in got}
        finally:
            app.close()
        assert ids <= revoked  # every task of both rounds, the errback included
    finally:
        idle.stop(timeout=10)
        redis.stop()


def test_a_chord_body_that_runs_early_is_retried(cluster: LocalCluster, tmp_path: Path) -> None:
    jobs = JobStore(connect(cluster.broker))
    plan = make_plan(small_spec(tmp_path, limit=120, shard_size=60), "0000000000c1")
    ref = plan.save().to_message()
    jobs.create(plan.job_id, record_fields(plan, plan.save(), 0, []))
    for s in plan.shards:
        steps.run_extract(jobs, ref, s.id)
    steps.run_collect(jobs, ref)
    assert plan.sweep is not None and len(plan.sweep) == 3
    steps.run_sweep(jobs, ref, 0)
    steps.run_sweep(jobs, ref, 1)  # slice 2 has not landed: the body came too early
    app = make_app(cluster.broker)
    try:
        res = app.send_task("featurefleet.train_probe", args=([], ref), queue="ff.train")
        time.sleep(2.5)  # the worker tried, found 2 of 3 slices, and scheduled a retry
        assert not res.ready()
        steps.run_sweep(jobs, ref, 2)
        trained = res.get(timeout=120)
    finally:
        app.close()
    assert trained["sweep"]["chosen_l2"] in {v for sl in plan.sweep for v in sl}
    # every slice's points are in (a few labels: every third penalty, by cross-validation)
    assert len(trained["sweep"]["curve"]) == 45 // 3
    assert trained["sweep"]["scored_by"] == "3-fold cross-validation"
    logs = "".join(p.log.read_text(errors="replace") for p in cluster.procs)
    assert "2 of 3 sweep slices recorded" in logs  # the retry, in the worker's own log


def _digit_folder(root: Path, corrupt: set[int]) -> None:
    d = load_digits()
    for i in range(160):
        path = root / str(d.target[i] % 3) / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in corrupt:
            path.write_bytes(b"\x89PNG not really %d" % i)
        else:
            Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(path)


def _ids(job_dir: Path) -> tuple[dict[str, list[int]], set[int]]:
    splits = json.loads((job_dir / "splits.json").read_text())
    with open(job_dir / "predictions.csv") as fh:
        test = {int(r["index"]) for r in csv.DictReader(fh)}
    return splits, test


def test_probe_and_finetune_see_the_same_samples(cluster: LocalCluster, tmp_path: Path) -> None:
    corrupt = set(range(3, 160, 11))  # 15 unreadable files spread over every split
    _digit_folder(tmp_path / "f", corrupt)
    base = JobSpec.from_dict({
        "data": {"source": "imagefolder", "path": str(tmp_path / "f"), "shard_size": 50,
                 "max_skipped_fraction": 0.2},
        "backbone": {"image_size": 32}, "probe": {"l2": 0.01, "heads": ["linear", "knn"]},
        "finetune": {"epochs": 1, "batch_size": 16, "hflip": False},
        "output": str(tmp_path / "out")})
    probe = submit(base, broker=cluster.broker)
    finetune = submit(base.replace(strategy="finetune"), broker=cluster.broker)
    for job in (probe, finetune):
        st = job.wait(timeout=400)
        assert st["status"] == "SUCCESS", st.get("error")
    plan = json.loads((Path(probe.status()["job_dir"]) / "plan.json").read_text())
    planned = {k: set(plan["splits"][k]) for k in ("train", "val", "test")}
    from pipeline.sources import open_source

    files = open_source(base.resolved().data).files  # type: ignore[attr-defined]
    bad = {i for i, f in enumerate(files) if int(Path(f).stem) in corrupt}
    assert all(planned[k] & bad for k in planned)  # every split lost some samples
    p_splits, p_test = _ids(Path(probe.status()["job_dir"]))
    f_splits, f_test = _ids(Path(finetune.status()["job_dir"]))
    assert p_test == f_test == planned["test"] - bad
    assert set(p_splits["val"]) == set(f_splits["val"]) == planned["val"] - bad
    assert set(p_splits["train"]) == planned["train"] - bad
    # fine-tuning drops each epoch's last partial batch: it trained on the plan's readable
    # train samples it drew, never on anything else
    assert set(f_splits["train"]) <= planned["train"] - bad
    assert len(f_splits["train"]) >= len(planned["train"] - bad) - 16
    for job in (probe, finetune):
        rep = job.result()
        assert rep["metrics"]["samples"] == len(planned["test"] - bad)
        assert rep["data"]["split_used"]["test"] == len(planned["test"] - bad)
        assert {s["id"] for s in rep["data"]["skipped"]} >= {files[i] for i in
                                                              bad & planned["test"]}
    knn = probe.result()["heads"]["knn"]["metrics"]["samples"]
    assert knn == len(planned["test"] - bad)  # every head on the same test ids
    assert Job(probe.id, cluster.broker).status()["images_skipped"] == len(bad)
