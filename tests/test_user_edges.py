"""Rough edges a new user hit (issue 14, items 14-17): skipped samples shown where the
numbers are, predict classifies what it can, cache verify --json fails on bad shards, and a
job waiting with no worker says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.store.files import sha256_of
from workers.launcher import LocalCluster, start_redis

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "pipeline"]


def _folder_with_bad_files(root: Path) -> None:
    d = load_digits()
    for i in range(60):
        p = root / str(d.target[i] % 2) / f"{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(p)
    (root / "0" / "empty.png").write_bytes(b"")
    (root / "1" / "junk.png").write_bytes(b"not an image at all")


def test_skips_show_in_submit_report_and_html(cluster: LocalCluster, tmp_path: Path) -> None:
    _folder_with_bad_files(tmp_path / "f")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"data: {{source: imagefolder, path: {tmp_path / 'f'}, shard_size: 30}}\n"
                    f"backbone: {{image_size: 32}}\noutput: {tmp_path / 'out'}\n")
    run = subprocess.run([*CLI, "submit", str(spec), "--broker", cluster.broker, "--wait"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "2 unreadable" in run.stdout
    assert "0/empty.png (ValueError: empty file)" in run.stdout
    assert "skipped 2" in run.stderr  # the progress line while it ran
    job_id = run.stdout.splitlines()[0]
    rep = subprocess.run([*CLI, "report", job_id, "--broker", cluster.broker],
                         capture_output=True, text=True, timeout=120)
    assert "2 unreadable" in rep.stdout and "1/junk.png" in rep.stdout
    data = json.loads(subprocess.run([*CLI, "report", job_id, "--broker", cluster.broker,
                                      "--json"], capture_output=True, text=True,
                                     timeout=120).stdout)["data"]
    reasons = {s["id"]: s["reason"] for s in data["skipped"]}
    assert reasons["0/empty.png"] == "ValueError: empty file"
    assert " at 0x" not in reasons["1/junk.png"] and "cannot identify" in reasons["1/junk.png"]
    used, planned = data["split_used"], data["split_sizes"]
    assert sum(planned.values()) - sum(used.values()) == 2  # the counts exclude them
    html = (tmp_path / "out" / "jobs" / job_id / "report.html").read_text()
    assert 'id="skipped"' in html and "2 sample(s) could not be read" in html


def test_predict_classifies_the_readable_images(cluster: LocalCluster, tmp_path: Path) -> None:
    from pipeline import submit
    from tests.conftest import small_spec

    job = submit(small_spec(tmp_path, limit=150), broker=cluster.broker)
    assert job.wait(timeout=300)["status"] == "SUCCESS"
    good = tmp_path / "seven.png"
    Image.fromarray(np.round(load_digits().images[7] * 255 / 16).astype(np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG nope")
    args = [*CLI, "predict", job.status()["job_dir"], str(good), str(tmp_path / "bad.png"),
            str(good)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1  # not every image could be read ...
    assert run.stdout.count("seven.png: ") == 2  # ... but every readable one is classified
    assert "bad.png" in run.stderr and "1 of 3 image(s) could not be read" in run.stderr
    got = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True,
                                    timeout=300).stdout)
    assert [bool(r.get("error")) for r in got] == [False, True, False]
    assert got[0]["label"] == got[2]["label"] and got[1]["label"] is None


def test_cache_verify_json_fails_on_a_bad_shard(cluster: LocalCluster, tmp_path: Path) -> None:
    from pipeline import submit
    from tests.conftest import small_spec

    job = submit(small_spec(tmp_path, limit=100), broker=cluster.broker)
    assert job.wait(timeout=300)["status"] == "SUCCESS"
    victim = Path(job.result()["shards"][0]["path"])
    before = sha256_of(victim)
    with open(victim, "r+b") as fh:
        fh.seek(victim.stat().st_size - 10)
        fh.write(b"0123456789")
    assert sha256_of(victim) != before
    store = str(tmp_path / "store")
    run = subprocess.run([*CLI, "cache", "verify", "--store", store, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and json.loads(run.stdout)[0]["path"] == str(victim)


def test_a_job_without_workers_says_so(tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "redis")
    try:
        spec = tmp_path / "job.yaml"
        spec.write_text(f"data: {{source: digits, limit: 60}}\nbackbone: {{image_size: 32}}\n"
                        f"output: {tmp_path / 'out'}\n")
        run = subprocess.run([*CLI, "submit", str(spec), "--broker", redis.url],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "no worker consumes ff.extract, ff.train" in run.stderr
        job_id = run.stdout.strip()
        st = subprocess.run([*CLI, "status", job_id, "--broker", redis.url],
                            capture_output=True, text=True, timeout=120)
        assert "workers on ff.extract: none online" in st.stdout
        raw = json.loads(subprocess.run([*CLI, "status", job_id, "--broker", redis.url,
                                         "--json"], capture_output=True, text=True,
                                        timeout=120).stdout)
        assert raw["workers"] == {"ff.extract": [], "ff.train": []}
    finally:
        redis.stop()
