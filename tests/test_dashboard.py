"""Flower through `featurefleet dashboard`: authentication required, the job's tasks listed, the
job view (/jobs) listing jobs from their records, and both pages seen in a real headless
Chromium (screenshots saved as test artifacts)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline import submit
from pipeline.errors import FeaturefleetError
from pipeline.settings import FLOWER_AUTH_ENV
from tests.conftest import ARTIFACTS, small_spec
from workers.dashboard import dashboard
from workers.launcher import LocalCluster, free_port, spawn

AUTH = "ops:s3cret-pass"


def _get(url: str, auth: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except urllib.error.URLError:
        return 0, ""  # not listening yet


@pytest.mark.integration
def test_dashboard_refuses_to_start_without_auth() -> None:
    with pytest.raises(FeaturefleetError, match="needs authentication"):
        dashboard("redis://x", address="0.0.0.0")
    with pytest.raises(FeaturefleetError, match="needs authentication"):
        dashboard("redis://x", address="127.0.0.1")
    argv, env = dashboard("redis://x", address="127.0.0.1", allow_no_auth_on_loopback=True)
    assert "FLOWER_BASIC_AUTH" not in env and "--address=127.0.0.1" in argv
    with pytest.raises(FeaturefleetError, match="user:password"):
        dashboard("redis://x", auth="nopassword")
    cli = subprocess.run([sys.executable, "-m", "pipeline", "dashboard", "--address",
                          "0.0.0.0", "--broker", "redis://127.0.0.1:1/0"], capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 2 and "needs authentication" in cli.stderr


@pytest.mark.integration
def test_flower_lists_the_jobs_tasks_behind_auth(cluster: LocalCluster, tmp_path: Path) -> None:
    """`featurefleet dashboard` as a user starts it (password in the environment): it asks the
    workers to send task events, then Flower lists the job's tasks."""
    port = free_port()
    argv, env = dashboard(cluster.broker, port=port, auth=AUTH)
    assert AUTH not in " ".join(argv)  # the password is not on the command line
    env = {**env, FLOWER_AUTH_ENV: AUTH}
    env.pop("FLOWER_BASIC_AUTH")
    early = submit(small_spec(tmp_path / "early", limit=100), broker=cluster.broker)
    assert early.wait(timeout=240)["status"] == "SUCCESS"  # finished before Flower started
    flower = spawn("flower", [sys.executable, "-m", "pipeline", "dashboard", "--port",
                              str(port), "--broker", cluster.broker], tmp_path / "flower.log", env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _get(base + "/healthcheck")[0] != 200:
            assert flower.alive() and time.monotonic() < deadline, flower.log_tail()
            time.sleep(0.3)
        started = flower.log.read_text()
        assert re.search(r"; [1-9]\d* worker\(s\) online sending task events", started), started
        job = submit(small_spec(tmp_path, limit=150), broker=cluster.broker)
        assert job.wait(timeout=240)["status"] == "SUCCESS"
        assert _get(base + "/api/workers")[0] == 401
        assert _get(base + "/api/workers", "ops:wrong")[0] == 401
        status, body = _get(base + "/api/workers?refresh=1", AUTH)
        assert status == 200 and any(w.startswith("extract1@") for w in json.loads(body))
        deadline = time.monotonic() + 30
        while True:
            status, body = _get(base + "/api/tasks", AUTH)
            tasks = json.loads(body) if status == 200 else {}
            ours = [t for t in tasks if t.startswith(job.id + ".extract.")]
            if len(ours) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 200 and len(ours) == 3  # every extraction task, named by job+shard
        assert all(tasks[t]["state"] == "SUCCESS" for t in ours)
        assert _get(base + "/metrics")[0] == 401  # Flower's own default: open to all
        status, metrics = _get(base + "/metrics", AUTH)
        assert status == 200 and "flower_events_total" in metrics
        assert _get(base + "/healthcheck")[0] == 200
        # the job view: every job from the records, the early one too, behind the same auth
        assert _get(base + "/jobs")[0] == 401 and _get(base + "/jobs.json")[0] == 401
        status, body = _get(base + "/jobs.json", AUTH)
        listed = {r["id"]: r for r in json.loads(body)}
        assert status == 200 and {job.id, early.id} <= set(listed)
        assert listed[job.id]["status"] == "SUCCESS" and listed[job.id]["percent"] == 100
        assert listed[early.id]["kind"] == "classify (probe)" and listed[early.id]["top1"] > 0.5
        status, html = _get(base + f"/jobs/{job.id}/report.html", AUTH)
        report = Path(job.status()["report"])
        assert status == 200 and html == report.with_suffix(".html").read_text()
        assert _get(base + f"/jobs/{job.id}/report.html")[0] == 401
        for bad in (f"/jobs/{job.id}/plan.json", f"/jobs/{job.id}/..%2Fplan.json",
                    "/jobs/nope/report.html", "/compare/../report.json"):
            assert _get(base + bad, AUTH)[0] == 404, bad
        chromium = shutil.which("chromium")
        assert chromium, "no chromium: apt-get install chromium (make test installs it)"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        user, password = AUTH.split(":")
        page = f"http://{user}:{password}@127.0.0.1:{port}/tasks"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
                 "--virtual-time-budget=8000"]
        dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True,
                             text=True, timeout=120).stdout
        assert job.id in dom, dom[-2000:]
        shot = ARTIFACTS / "flower-tasks.png"
        subprocess.run([chromium, *flags, "--window-size=1400,900", f"--screenshot={shot}",
                        page], capture_output=True, timeout=120, check=True)
        assert shot.stat().st_size > 10_000
        jobs_page = f"http://{user}:{password}@127.0.0.1:{port}/jobs?refresh=0"
        dom = subprocess.run([chromium, *flags, "--dump-dom", jobs_page], capture_output=True,
                             text=True, timeout=120).stdout
        row = dom[dom.index(f'id="job-{job.id}"'):][:3000]
        assert "SUCCESS" in row and "100%" in row and f"/jobs/{job.id}/report.html" in row, row
        assert f'id="job-{early.id}"' in dom
        shot = ARTIFACTS / "job-view.png"
        subprocess.run([chromium, *flags, "--window-size=1400,900", f"--screenshot={shot}",
                        jobs_page], capture_output=True, timeout=120, check=True)
        assert shot.stat().st_size > 10_000
    finally:
        flower.stop(timeout=10)


def test_job_view_rows_and_the_files_a_record_names(jobs: Any, tmp_path: Path) -> None:
    """Rows say stage, percent and ETA; only report files that a record names are served."""
    from workers.jobview import file_for, rows

    report = tmp_path / "jobs" / "j1" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    report.with_suffix(".html").write_text("<html>report</html>")
    (tmp_path / "jobs" / "j1" / "plan.json").write_text("{}")
    jobs.create("j1", {"name": "one", "kind": "classify", "strategy": "probe",
                       "images_total": 200, "images_cached": 50, "stage": "extract",
                       "started": time.time() - 10})
    jobs.update("j1", status="RUNNING")
    jobs.shard_progress("j1", "s0", 50)
    jobs.create("j2", {"name": "two", "kind": "pretrain", "stage": "pretrain",
                       "pretrain": {"epochs": 4, "steps": 10, "epoch": 2, "step": 5}})
    got = {r["id"]: r for r in rows(jobs)}
    assert got["j1"]["percent"] == 50 and got["j1"]["status"] == "RUNNING"
    assert "images 100/200" in got["j1"]["progress"] and got["j1"]["eta"].startswith("ETA ")
    assert got["j2"]["percent"] == 38 and got["j2"]["kind"] == "pretrain"  # 15 of 40 steps
    assert file_for(jobs, "jobs", "j1", "report.html") is None  # not finished: no report
    jobs.finish("j1", "SUCCESS", report=str(report), top1=0.9)
    found = file_for(jobs, "jobs", "j1", "report.html")
    assert found is not None and found[0].read_text() == "<html>report</html>"
    assert file_for(jobs, "jobs", "j1", "plan.json") is None
    assert file_for(jobs, "jobs", "missing", "report.html") is None
    assert file_for(jobs, "compare", "j1", "leaderboard.html") is None
    assert {r["id"]: r for r in rows(jobs)}["j1"]["percent"] == 100
