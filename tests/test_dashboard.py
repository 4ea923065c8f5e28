"""Flower through `featurefleet dashboard`: authentication required, the job's tasks listed, and
the task list seen in a real headless Chromium (screenshot saved as a test artifact)."""

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

import pytest

from pipeline import submit
from pipeline.errors import FeaturefleetError
from pipeline.settings import FLOWER_AUTH_ENV
from tests.conftest import ARTIFACTS, small_spec
from workers.dashboard import dashboard
from workers.launcher import LocalCluster, free_port, spawn

pytestmark = pytest.mark.integration
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


def test_flower_lists_the_jobs_tasks_behind_auth(cluster: LocalCluster, tmp_path: Path) -> None:
    """`featurefleet dashboard` as a user starts it (password in the environment): it asks the
    workers to send task events, then Flower lists the job's tasks."""
    port = free_port()
    argv, env = dashboard(cluster.broker, port=port, auth=AUTH)
    assert AUTH not in " ".join(argv)  # the password is not on the command line
    env = {**env, FLOWER_AUTH_ENV: AUTH}
    env.pop("FLOWER_BASIC_AUTH")
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
    finally:
        flower.stop(timeout=10)
