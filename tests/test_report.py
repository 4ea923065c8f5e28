"""Probe protocol, heads, report.html (seen by a real headless Chromium) and predict, end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import load_classifier, submit
from tests.conftest import ARTIFACTS, small_spec
from workers.launcher import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def three_heads(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("heads")
    spec = small_spec(out, limit=600, shard_size=200).replace(
        backbone={"image_size": 64}, probe={"heads": ["linear", "mlp", "knn"], "mlp_hidden": 64})
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=400)
    assert st["status"] == "SUCCESS", st
    return {"report": job.result(), "status": st, "job": job}


def test_sweep_and_heads_in_report(three_heads: dict) -> None:
    rep = three_heads["report"]
    sweep = rep["sweep"]
    assert len(sweep["curve"]) == 45 and len(sweep["task_seconds"]) == 3
    assert sweep["grid"][0] == pytest.approx(1e5) and sweep["grid"][-1] == pytest.approx(1e-6)
    assert sweep["chosen_l2"] in sweep["grid"]
    top = max(p["val_top1"] for p in sweep["curve"])  # chosen: within 1 SE, lowest loss
    n = sweep["curve"][0]["val_n"]
    assert top - sweep["chosen_val_top1"] <= (top * (1 - top) / n) ** 0.5 + 1e-9
    assert sweep["scored_by"] == "validation"
    assert set(rep["heads"]) == {"linear", "mlp", "knn"} and rep["primary_head"] == "linear"
    assert rep["metrics"] == rep["heads"]["linear"]["metrics"]
    for name, head in rep["heads"].items():
        assert head["metrics"]["samples"] == 180 and head["metrics"]["top1"] > 0.6, name
        assert Path(head["path"]).is_file()
    assert rep["heads"]["knn"]["k"] >= 1
    splits = json.loads((Path(rep["spec"]["output"]) / "jobs" / rep["job_id"] / "splits.json")
                        .read_text())
    assert len(splits["train"]) + len(splits["val"]) == 420
    assert not set(splits["train"]) & set(splits["val"])


def test_report_html_renders_in_chromium(three_heads: dict) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium: apt-get install chromium (make test installs it)"
    html = Path(three_heads["status"]["report"]).with_suffix(".html")
    assert html.is_file()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={html.parent / 'chromium-profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", html.as_uri()], capture_output=True,
                         text=True, timeout=120)
    for plot in ('id="confusion"', 'id="sweep"', 'id="f1"'):
        assert plot in dom.stdout, plot
    assert "<polyline" in dom.stdout and dom.stdout.count("<rect") > 100
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1800",
                    html.as_uri()], capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # The plots put colour on the page: blue cells, the blue curve, green bars.
    blueish = ((img[..., 2] > 150) & (img[..., 0] < 120)).mean()
    greenish = ((img[..., 1] > 120) & (img[..., 0] < 100) & (img[..., 2] < 130)).mean()
    assert blueish > 0.001 and greenish > 0.002


def test_predict_python_and_cli(three_heads: dict, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    rep = three_heads["report"]
    splits_file = Path(rep["spec"]["output"]) / "jobs" / rep["job_id"] / "splits.json"
    used = set(json.loads(splits_file.read_text())["train"])
    d = load_digits()
    fresh = [i for i in range(len(d.target)) if i not in used][:20]
    paths = []
    for i in fresh:
        p = tmp_path / f"digit{i}-{d.target[i]}.png"
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(p)
        paths.append(str(p))
    job_dir = Path(rep["spec"]["output"]) / "jobs" / rep["job_id"]
    clf = load_classifier(job_dir)
    got = clf.predict(paths)
    right = sum(g["label"] == str(d.target[i]) for g, i in zip(got, fresh, strict=True))
    assert right >= 15, [g["label"] for g in got]
    assert all(0 < g["probability"] <= 1 and len(g["top"]) == 3 for g in got)
    cli = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(job_dir),
                          *paths[:5], "--json"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert [r["label"] for r in json.loads(cli.stdout)] == [g["label"] for g in got[:5]]
    bad = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(tmp_path),
                          paths[0]],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no trained head" in bad.stderr
