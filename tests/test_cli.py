"""The command line as a user runs it: the demo end to end, Ctrl-C, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import processes_marked

CLI = [sys.executable, "-m", "pipeline"]


def _no_processes_left(marker: str, wait: float = 10.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + wait
    left = processes_marked(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_marked(marker)
    return left


@pytest.mark.integration
def test_demo_runs_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = subprocess.run([*CLI, "demo", "--output", str(out), "--image-size", "32",
                          "--limit", "250", "--shard-size", "100"],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "test top-1" in run.stdout and "report:" in run.stdout
    report_path = Path(run.stdout.split("report:")[1].split()[0])
    rep = json.loads(report_path.read_text())
    assert report_path.parent.parent == out / "jobs"
    assert rep["status"] == "SUCCESS" and rep["metrics"]["top1"] > 0.5
    assert all(Path(s["path"]).is_relative_to(out / "store") for s in rep["shards"])
    assert "images" in run.stderr  # the progress line was shown
    assert _no_processes_left(str(out / "cluster")) == []


@pytest.mark.integration
def test_run_a_job_file_of_any_kind_on_this_machine(tmp_path: Path) -> None:
    """featurefleet run: the user's own job file (here a pretraining job) with a private Redis
    and workers, progress, the summary and both report paths; nothing left running."""
    out = tmp_path / "runs"
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""kind: pretrain
data: {{source: digits, limit: 160}}
backbone: {{name: resnet18, weights: random, image_size: 32}}
pretrain: {{method: autoencoder, epochs: 1, batch_size: 32, hflip: false}}
output: {out}
""")
    run = subprocess.run([*CLI, "run", str(spec)], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "featurefleet run: starting a private Redis" in run.stdout
    report = Path(run.stdout.split("report:")[1].split()[0])
    page = Path(run.stdout.split("page:")[1].split()[0])
    assert report.is_file() and page.is_file() and page.suffix == ".html"
    assert json.loads(report.read_text())["kind"] == "pretrain"
    assert "epoch" in run.stderr  # the progress line
    assert _no_processes_left(str(out / "cluster")) == []


@pytest.mark.integration
def test_ctrl_c_during_demo_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen([*CLI, "demo", "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("submitted job") or time.monotonic() > deadline:
            break
    assert any(line.startswith("submitted job") for line in seen), "".join(seen)
    time.sleep(2)  # let extraction start
    assert processes_marked(str(out / "cluster")), "the demo should have started processes"
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    proc.communicate(timeout=90)
    assert proc.returncode == 130
    assert _no_processes_left(str(out / "cluster")) == []
    # No half-written shard is left in the store: only complete .h5 files, no temp files.
    assert not [p for p in (out / "store").rglob("*.tmp")]


def _bad(tmp_path: Path, yaml_text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml_text)
    return subprocess.run([*CLI, "submit", str(spec), "--broker", "redis://127.0.0.1:1/0",
                           *extra], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("yaml_text", "words"), [
    ("backbone: {name: resnet5000}\n", "unknown backbone 'resnet5000'"),
    ("backbone: {name: resnet18, weights: IMAGENET9K}\n", "unknown weights 'IMAGENET9K'"),
    ("backbone: {name: resnet18, weights: /nope/w.pth}\n", "weights file '/nope/w.pth'"),
    ("data: {source: imagefolder, path: /nonexistent/images}\n", "does not exist"),
    ("data: {source: imagefolder, path: EMPTY}\n", "has no class subfolders"),
    ("data: {source: digits\nbackbone: [\n", "not valid YAML"),
    ("data: {shard_size: 0}\n", "'data.shard_size': 0 must be > 0"),
    ("name: fine\n", "cannot reach Redis at 'redis://127.0.0.1:1/0'"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, yaml_text: str, words: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    run = _bad(tmp_path, yaml_text.replace("EMPTY", str(empty)) + f"output: {out}\n")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("featurefleet: error:") and words in lines[0]
    assert "fix:" in lines[0] and "Traceback" not in run.stderr
    assert not out.exists()  # nothing half-written


def test_wrong_architecture_weights_file(tmp_path: Path) -> None:
    import torch
    from torchvision.models import resnet18

    w = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), w)
    from pipeline.backbones import load_backbone
    from pipeline.errors import BackboneError

    with pytest.raises(BackboneError, match=r"does not fit architecture 'efficientnet_lite0'"):
        load_backbone("efficientnet_lite0", str(w))
    bb = load_backbone("resnet18", str(w))  # the right architecture loads
    assert bb.feature_dim == 512 and bb.weights.id == "r18.pth"


def test_backbone_registry_lists_lite0_and_torchvision() -> None:
    from pipeline.backbones import list_backbones, resolve_weights

    names = list_backbones()
    assert {"efficientnet_lite0", "resnet50", "vit_b_16"} <= set(names)
    info = resolve_weights("resnet50", "IMAGENET1K_V2")
    assert info.preprocessing.resize == 232 and info.preprocessing.crop == 224  # from the weights
