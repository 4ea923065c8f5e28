"""Integrity of results (issue 14, items 1-5): no sample in two splits, no evaluation on
classes never trained, no stale features, no checksum laundering, true checksums under
concurrent identical jobs. Each test fails on the code before the fix."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline import submit
from pipeline.errors import DataError
from pipeline.planner import make_plan
from pipeline.sources import digests, open_source
from pipeline.spec import JobSpec
from pipeline.store import cache
from pipeline.store.files import sha256_of
from pipeline.store.manifest import read_manifest
from pipeline.store.shards import read_shard
from tests.conftest import small_spec
from workers.launcher import LocalCluster, start_redis, start_worker, wait_for_workers

JOB = "00000000001d"


def noise_manifest(root: Path, n: int, copies: int = 2, seed: int = 0,
                   split: list[str] | None = None) -> Path:
    """``n`` random-noise images, each written ``copies`` times under other names, each copy
    with a random binary label (the attack of issue 14 item 1)."""
    rng = np.random.default_rng(seed)
    lines = ["path,label" + (",split" if split else "")]
    for i in range(n):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        for c in range(copies):
            name = f"img{i:03d}-copy{c}.png"
            Image.fromarray(pixels).save(root / name)
            row = f"{name},{rng.integers(0, 2)}"
            lines.append(row + (f",{split[c]}" if split else ""))
    (root / "m.csv").write_text("\n".join(lines))
    return root / "m.csv"


def spec_for(root: Path, manifest: Path, **data: object) -> JobSpec:
    return JobSpec.from_dict({"data": {"source": "manifest", "path": str(manifest),
                                       "shard_size": 100, **data},
                              "backbone": {"image_size": 32}, "output": str(root / "out")})


def content_of(plan: object, ids: list[int], src: object) -> list[bytes]:
    return [d.tobytes() for d in digests(src, ids)]  # type: ignore[arg-type]


def test_duplicates_never_straddle_splits_and_conflicts_are_left_out(tmp_path: Path) -> None:
    manifest = noise_manifest(tmp_path, 60)
    spec = spec_for(tmp_path, manifest)
    plan = make_plan(spec, JOB)
    src = open_source(spec.resolved().data)
    used = plan.splits.train + plan.splits.val + plan.splits.test
    content = content_of(plan, used, src)
    assert len(set(content)) == len(content)  # every image at most once, in one split
    kinds = {e.kind for e in plan.excluded}
    assert kinds == {"duplicate", "conflict"}
    by_index = {e.index: e for e in plan.excluded}
    for i in range(60):  # each pair: one copy kept (same labels) or both out (conflict)
        pair = [2 * i, 2 * i + 1]
        labels = {int(src.labels[p]) for p in pair}
        out = [p for p in pair if p in by_index]
        if len(labels) == 2:
            assert out == pair and by_index[pair[0]].kind == "conflict"
        else:
            assert len(out) == 1 and "exact duplicate of" in by_index[out[0]].reason
    assert set(by_index).isdisjoint(used)
    keep = spec.replace(data={"duplicates": "keep"})
    assert make_plan(keep, JOB).excluded == []  # the user may keep them (and is warned by
    with pytest.raises(DataError, match=r"same content but the labels.*fix:.*conflicts"):
        make_plan(spec.replace(data={"conflicts": "error"}), JOB)  # the quality stage)


def test_a_test_copy_in_train_is_removed_from_train(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    lines = ["path,label,split"]
    for i in range(40):  # 40 training images; the first 10 also sit in test, renamed
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"train{i}.png")
        lines.append(f"train{i}.png,{i % 2},train")
        if i < 10:
            Image.fromarray(pixels).save(tmp_path / f"test{i}.png")
            lines.append(f"test{i}.png,{i % 2},test")
    (tmp_path / "m.csv").write_text("\n".join(lines))
    spec = spec_for(tmp_path, tmp_path / "m.csv")
    plan = make_plan(spec, JOB)
    src = open_source(spec.resolved().data)
    assert [src.sample_id(i) for i in plan.splits.test] == [f"test{i}.png" for i in range(10)]
    assert sorted(src.sample_id(e.index) for e in plan.excluded) == sorted(
        f"train{i}.png" for i in range(10))  # the leaked training copies, not the test set
    assert len(plan.splits.train) + len(plan.splits.val) == 30


def test_unseen_test_classes_fail_at_planning_unless_allowed(tmp_path: Path) -> None:
    for i, (label, split) in enumerate([("a", "train")] * 6 + [("b", "train")] * 6
                                       + [("a", "test"), ("c", "test")]):
        Image.new("RGB", (8, 8), (i * 17, 0, 0)).save(tmp_path / f"{i}.png")
        with open(tmp_path / "m.csv", "a") as fh:
            fh.write("path,label,split\n" if i == 0 else "")
            fh.write(f"{i}.png,{label},{split}\n")
    spec = spec_for(tmp_path, tmp_path / "m.csv")
    with pytest.raises(DataError, match=r"test split have no training sample: \['c'\].*fix:"):
        make_plan(spec, JOB)
    plan = make_plan(spec.replace(data={"allow_unseen_test_classes": True}), JOB)
    assert plan.warnings and "['c']" in plan.warnings[0]


@pytest.mark.integration
def test_leaked_duplicates_do_not_inflate_accuracy(cluster: LocalCluster, tmp_path: Path) -> None:
    manifest = noise_manifest(tmp_path, 200, seed=1)  # 400 rows, labels are coin flips
    job = submit(spec_for(tmp_path, manifest), broker=cluster.broker)
    st = job.wait(timeout=400)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    assert rep["metrics"]["top1"] < 0.7  # chance is 0.5; leaked duplicates gave ~1.0
    excluded = rep["data"]["excluded"]
    assert len(excluded) >= 200 and {e["kind"] for e in excluded} == {"duplicate", "conflict"}
    html = Path(st["report"]).with_suffix(".html").read_text()
    assert "excluded at planning" in html


def _bmp_folder(root: Path) -> None:
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / c / f"{i}.bmp")  # BMP: the same size in bytes whatever the pixels


@pytest.mark.integration
def test_a_file_rewritten_with_the_same_size_and_time_is_extracted_again(
        cluster: LocalCluster, tmp_path: Path) -> None:
    root = tmp_path / "f"
    _bmp_folder(root)
    spec = JobSpec.from_dict({"data": {"source": "imagefolder", "path": str(root),
                                       "shard_size": 20}, "backbone": {"image_size": 32},
                              "output": str(tmp_path / "out")})
    first = submit(spec, broker=cluster.broker)
    assert first.wait(timeout=300)["status"] == "SUCCESS"
    victim = root / "a" / "3.bmp"
    st = victim.stat()
    Image.new("RGB", (16, 16), (250, 0, 0)).save(victim)  # as cp -p / rsync -t leave it
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    second = submit(spec, broker=cluster.broker)
    assert second.wait(timeout=300)["status"] == "SUCCESS"
    assert second.status()["shards_cached"] == 0  # new content, new key: nothing stale reused
    r1, r2 = first.result(), second.result()
    old = {s["id"]: read_shard(s["path"]) for s in r1["shards"]}
    new = {s["id"]: read_shard(s["path"]) for s in r2["shards"]}
    sid = next(k for k, v in new.items() if "a/3.bmp" in v.sample_ids)
    row = new[sid].sample_ids.index("a/3.bmp")
    assert not np.array_equal(old[sid].features[row], new[sid].features[row])
    # data.fingerprint: stat trusts size + time (the documented trade-off): it reuses
    stat = spec.replace(data={"fingerprint": "stat"})
    assert submit(stat, broker=cluster.broker).wait(timeout=300)["status"] == "SUCCESS"
    again = submit(stat, broker=cluster.broker)
    assert again.wait(timeout=300)["shards_cached"] == again.status()["shards_total"]


@pytest.mark.integration
def test_a_cached_shard_damaged_while_queued_is_not_blessed(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, limit=120, shard_size=60)
    redis = start_redis(tmp_path / "redis")
    logs = tmp_path / "logs"
    procs = [start_worker(redis.url, ["ff.extract"], "x@launder", logs),
             start_worker(redis.url, ["ff.train"], "t@launder", logs)]
    try:
        wait_for_workers(redis.url, ["x@launder", "t@launder"], procs)
        first = submit(spec, broker=redis.url)
        assert first.wait(timeout=300)["status"] == "SUCCESS"
        rep = first.result()
        shard_dir = rep["feature_store"]["dir"]
        recorded = read_manifest(shard_dir)["shards"]
        for p in procs:  # nobody consumes while the next job waits in the queue
            p.stop(timeout=10)
        queued = submit(spec, broker=redis.url)
        assert queued.status()["shards_cached"] == 2
        victim = Path(rep["shards"][0]["path"])
        with h5py.File(victim, "r+") as f:  # still a valid shard, other numbers
            f["features"][0, :4] = 7.0
        procs = [start_worker(redis.url, ["ff.extract"], "x2@launder", logs),
                 start_worker(redis.url, ["ff.train"], "t2@launder", logs)]
        wait_for_workers(redis.url, ["x2@launder", "t2@launder"], procs)
        st = queued.wait(timeout=300)
        assert st["status"] == "FAILED" and "changed after planning" in st["error"]
        assert read_manifest(shard_dir)["shards"] == recorded  # the writer's checksums stand
        problems = cache.verify(Path(spec.store_dir))
        assert [p["path"] for p in problems] == [str(victim)]
        again = submit(spec, broker=redis.url)  # planning trusts it no more: re-extracted
        assert again.wait(timeout=300)["status"] == "SUCCESS"
        assert again.status()["shards_cached"] == 1
        assert sha256_of(victim) == read_manifest(shard_dir)["shards"][victim.name]["sha256"]
    finally:
        for p in procs:
            p.stop(timeout=10)
        redis.stop()


@pytest.mark.integration
def test_concurrent_identical_jobs_report_true_checksums(tmp_path: Path) -> None:
    from tests.test_faults import cluster_env

    with cluster_env(tmp_path, extract_workers=2) as c:
        spec = small_spec(tmp_path, limit=160, shard_size=40)
        jobs = [submit(spec, broker=c.broker) for _ in range(6)]
        for job in jobs:
            assert job.wait(timeout=400)["status"] == "SUCCESS"
        shas = {}
        for job in jobs:
            for s in job.result()["shards"]:
                assert sha256_of(s["path"]) == s["sha256"], (job.id, s["id"])
                shas.setdefault(s["id"], set()).add(s["sha256"])
        job_dir, samples = jobs[0].status()["job_dir"], jobs[0].result()["metrics"]["samples"]
    assert all(len(v) == 1 for v in shas.values())  # one file per shard, as every job says
    with open(Path(job_dir) / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == samples
