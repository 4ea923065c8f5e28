"""End to end on real parts: a redis-server process, Celery worker processes, real Lite0 weights,
real HDF5 files. The cluster fixture starts them once for this module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import get_job, submit
from pipeline.errors import BrokerError, JobError
from pipeline.store.files import sha256_of as file_sha256
from pipeline.store.shards import read_shard
from tests.conftest import small_spec
from workers.launcher import LocalCluster

pytestmark = pytest.mark.integration


def test_job_runs_through_the_whole_chord(cluster: LocalCluster, tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=240)
    assert st["status"] == "SUCCESS", st
    rep = job.result()
    assert rep["status"] == "SUCCESS" and rep["job_id"] == job.id
    m = rep["metrics"]
    # 210 training digits at 32 px: real ImageNet features separate them far above chance.
    assert m["top1"] > 0.6 and m["top5"] > m["top1"] - 1e-9
    assert 0 < m["balanced_accuracy"] <= 1
    assert len(m["confusion_matrix"]) == 10 and sum(map(sum, m["confusion_matrix"])) == 90
    assert set(m["per_class"]) == {str(i) for i in range(10)}
    # Every shard exists once, with the checksum the report says, and the rows add up.
    assert [s["id"] for s in rep["shards"]] == ["0-64", "64-128", "128-192", "192-256",
                                                "256-300"]
    ids: set[int] = set()
    for s in rep["shards"]:
        assert Path(s["path"]).is_file() and file_sha256(s["path"]) == s["sha256"]
        shard = read_shard(s["path"])
        assert shard.features.shape == (s["rows"], 1280)
        assert shard.attrs["backbone"] == "efficientnet_lite0"
        assert shard.attrs["weights_sha256"] == rep["backbone"]["weights_sha256"]
        ids |= set(shard.indices.tolist())
        assert s["worker"] and not s["cached"]
    sizes = rep["data"]["split_sizes"]
    assert sum(sizes.values()) == len(ids) == 300 and sizes["test"] == 90
    splits = json.loads((Path(st["job_dir"]) / "splits.json").read_text())
    assert len(splits["train"]) == sizes["train"] and len(splits["val"]) == sizes["val"]
    import csv

    with open(Path(st["job_dir"]) / "predictions.csv") as fh:
        test_ids = {int(r["index"]) for r in csv.DictReader(fh)}
    train_ids, val_ids = set(splits["train"]), set(splits["val"])
    assert len(test_ids) == 90 and not (train_ids & val_ids or train_ids & test_ids
                                        or val_ids & test_ids)
    assert train_ids | val_ids | test_ids == ids  # every extracted sample is in one split
    assert rep["spec"]["data"]["limit"] == 300
    assert {"extract_s", "train_s", "evaluate_s", "total_s"} <= set(rep["timings"])
    job_dir = Path(st["job_dir"])
    assert json.loads((job_dir / "spec.json").read_text())["name"] == "test-digits"
    assert (job_dir / "head.pt").is_file()
    # A job can be looked up again by id.
    again = get_job(job.id, broker=cluster.broker)
    assert again.status()["status"] == "SUCCESS" and again.result()["metrics"] == m


def test_second_run_reuses_the_cached_shards(cluster: LocalCluster, tmp_path: Path) -> None:
    spec = small_spec(tmp_path, limit=200)
    first = submit(spec, broker=cluster.broker)
    assert first.wait(timeout=240)["status"] == "SUCCESS"
    r1 = first.result()
    second = submit(spec, broker=cluster.broker)
    st = second.wait(timeout=240)
    assert st["status"] == "SUCCESS"
    assert st["shards_cached"] == st["shards_total"] == len(r1["shards"])
    r2 = second.result()
    assert all(s["cached"] for s in r2["shards"])
    assert [s["sha256"] for s in r2["shards"]] == [s["sha256"] for s in r1["shards"]]
    assert r2["metrics"]["top1"] == r1["metrics"]["top1"]
    # A different input size is a different cache key: extracted anew.
    third = submit(spec.replace(backbone={"image_size": 48}), broker=cluster.broker)
    assert third.wait(timeout=240)["shards_cached"] == 0


def test_unknown_job_and_unreachable_broker(cluster: LocalCluster, tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"no job '0123456789ab'.*fix:"):
        get_job("0123456789ab", broker=cluster.broker)
    with pytest.raises(JobError, match=r"'\.\./\.\./x' is not a job id.*fix:"):
        get_job("../../x", broker=cluster.broker)  # an id is never a path
    with pytest.raises(BrokerError, match=r"cannot reach Redis.*fix:"):
        submit(small_spec(tmp_path), broker="redis://127.0.0.1:1/0")
    assert not (tmp_path / "jobs").exists()  # nothing written before the broker check


def test_cli_submit_status_report(cluster: LocalCluster, tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        "name: cli-job\n"
        "data: {source: digits, limit: 150, shard_size: 100}\n"
        "backbone: {name: efficientnet_lite0, image_size: 32}\n"
        f"output: {tmp_path / 'out'}\n")
    env_cli = [sys.executable, "-m", "pipeline"]
    out = subprocess.run([*env_cli, "submit", str(spec_file), "--broker", cluster.broker,
                          "--wait", "--timeout", "240"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0].strip()
    assert "test top-1" in out.stdout and "report:" in out.stdout
    st = subprocess.run([*env_cli, "status", job_id, "--broker", cluster.broker, "--json"],
                        capture_output=True, text=True, timeout=60)
    assert json.loads(st.stdout)["status"] == "SUCCESS"
    rep = subprocess.run([*env_cli, "report", job_id, "--broker", cluster.broker],
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0 and job_id in rep.stdout and "balanced accuracy" in rep.stdout
    jobs = subprocess.run([*env_cli, "jobs", "--broker", cluster.broker],
                          capture_output=True, text=True, timeout=60)
    assert job_id in jobs.stdout and cluster.redis is not None
    assert cluster.redis.password not in out.stdout + out.stderr + jobs.stdout


def test_prometheus_exporter(cluster: LocalCluster, tmp_path: Path) -> None:
    import re
    import time
    import urllib.request

    from workers.launcher import free_port, spawn

    job = submit(small_spec(tmp_path, limit=100), broker=cluster.broker)
    assert job.wait(timeout=240)["status"] == "SUCCESS"
    port = free_port()
    proc = spawn("exporter", [sys.executable, "-m", "pipeline", "exporter", "--broker",
                              cluster.broker, "--port", str(port)], tmp_path / "exporter.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                break
            except OSError:
                assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
                time.sleep(0.3)
    finally:
        proc.stop(timeout=5)

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value("featurefleet_images_extracted_total") >= 100
    assert value('featurefleet_jobs{status="SUCCESS"}') >= 1
    assert value('featurefleet_queue_length{queue="ff.extract"}') == 0
    buckets = [float(v) for v in re.findall(r'^featurefleet_shard_seconds_bucket\{le="[^"]+"\} '
                                            r"(\S+)$", text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] == value("featurefleet_shard_seconds_count")
    assert value("featurefleet_shard_seconds_count") >= 3
