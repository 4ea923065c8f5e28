"""Pretraining on the data-parallel engine: SimCLR and the autoencoder, two nodes meeting on
loopback (gloo), a rank killed mid-run and resumed, the encoder used as a backbone."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import compare, submit
from pipeline.engine.dist import Rank
from pipeline.errors import BackboneError, DataError, SpecError
from pipeline.planner import make_plan
from pipeline.pretrain.models import decoder_plan
from pipeline.pretrain.objectives import byol, nt_xent
from pipeline.spec import JobSpec
from pipeline.store.shards import read_shard
from tests.test_faults import cluster_env

JOB = "0000000000e1"


def pretrain_spec(out: Path, **pretrain: Any) -> JobSpec:
    return JobSpec.from_dict({
        "kind": "pretrain", "data": {"source": "digits", "limit": 400},
        "backbone": {"name": "resnet18", "weights": "random", "image_size": 32},
        "pretrain": {"method": "simclr", "epochs": 2, "batch_size": 32, "hflip": False,
                     "eval_every_epochs": 1, **pretrain},
        "output": str(out)})


def test_nt_xent_matches_the_reference_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    got = nt_xent(z1, z2, Rank(), temperature=0.5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / 0.5).numpy()
    losses = []
    for i in range(12):
        j = (i + 6) % 12
        others = [k for k in range(12) if k != i]
        losses.append(-sim[i, j] + np.log(np.exp(sim[i, others]).sum()))
    assert float(got) == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_byol_loss_momentum_and_target_update_match_their_formulas() -> None:
    from pipeline.pretrain.models import build, target_momentum

    torch.manual_seed(0)
    p, t = torch.randn(8, 5), torch.randn(8, 5)
    got = byol(p, t)
    pn = p / p.norm(dim=1, keepdim=True)
    tn = t / t.norm(dim=1, keepdim=True)
    want = np.mean([2 - 2 * float(pn[i] @ tn[(i + 4) % 8]) for i in range(8)])
    assert float(got) == pytest.approx(want, rel=1e-5)  # each view against the OTHER view
    assert target_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert target_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert target_momentum(0.99, 100, 100) == pytest.approx(1.0)
    net, dim = build("byol", "resnet18", "random", 32, 16, "cpu")
    assert dim == 512 and not any(q.requires_grad for q in net.target())
    assert all(q.requires_grad for q in [*net.online(), *net.predictor.parameters()])
    online0 = [q.detach().clone() for q in net.online()]
    target0 = [q.detach().clone() for q in net.target()]
    assert all(torch.equal(a, b) for a, b in zip(online0, target0, strict=True))
    with torch.no_grad():
        for q in net.online():
            q.add_(1.0)
    net.update_target(0.9)
    for a, b, q in zip(target0, net.target(), net.online(), strict=True):
        torch.testing.assert_close(b, 0.9 * a + 0.1 * q)


def test_did_it_help_calls_a_difference_only_beyond_its_noise() -> None:
    from pipeline.reports.pretrain import did_it_help

    refs = [{"encoder": "resnet18, initial weights (random)", "role": "initial",
             "knn_top1": 0.2, "probe_top1": 0.25},
            {"encoder": "efficientnet_lite0 (IMAGENET1K_V1), off the shelf",
             "role": "off the shelf", "knn_top1": 0.6, "probe_top1": 0.64}]
    hist = [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": 4.0, "knn_top1": 0.8,
                                        "probe_top1": 0.83}]
    got = did_it_help({"history": hist, "reference": refs}, 539)
    assert got is not None and got["answer"] == "ahead"
    main = next(r for r in got["rows"]
                if r["role"] == "off the shelf" and r["metric"] == "linear probe")
    p = (0.83 + 0.64) / 2
    assert main["noise"] == pytest.approx(2 * np.sqrt(p * (1 - p) * 2 / 539), abs=1e-4)
    assert main["difference"] == pytest.approx(0.19)
    assert got["summary"].startswith("yes: after 2 epochs") and "+0.190 over" in \
        got["summary"]
    assert got["summary"].endswith("against its own initial weights (0.250): +0.580, ahead")
    worse = did_it_help({"history": [{**hist[1], "probe_top1": 0.83}], "reference": [
        {**refs[0], "probe_top1": 0.95}, refs[1]]}, 539)
    assert worse is not None and worse["answer"] == "ahead"  # of the off-the-shelf backbone
    assert worse["summary"].endswith("behind: pretraining made the features worse")
    close = did_it_help({"history": [{**hist[1], "probe_top1": 0.66}], "reference": refs},
                        100)  # +0.02 on 100 samples: noise
    assert close is not None and close["answer"] == "no clear difference"
    assert close["summary"].startswith("not measurably")
    behind = did_it_help({"history": [{**hist[1], "probe_top1": 0.3}], "reference": refs}, 539)
    assert behind is not None and behind["summary"].startswith("no:")
    assert did_it_help({"history": hist, "reference": []}, 539) is None  # no labels
    assert did_it_help({"history": hist[:1], "reference": refs}, 539) is None


def test_decoder_reaches_the_input_size_or_says_why() -> None:
    assert decoder_plan(32) == (4, 3) and decoder_plan(224) == (7, 5) and decoder_plan(96) == (6, 4)
    with pytest.raises(SpecError, match=r"backbone.image_size.*100 px.*multiple of 8"):
        decoder_plan(100)


def _rank_pids(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "pipeline.jobs.ranks" in cmd and marker in cmd and "torch.distributed" not in cmd:
                found.append(int(pid))
    return found


@pytest.mark.integration
@pytest.mark.faults
def test_two_nodes_survive_a_killed_rank_and_the_encoder_is_a_backbone(tmp_path: Path) -> None:
    """Two nodes (two worker processes, one torchrun each) meet on loopback and train under
    DDP with gloo; a rank is SIGKILLed after the first checkpoint: both nodes stop their
    torchrun and meet again in the next generation (no agent restarts ranks on its own, so
    no rank meets a peer of an older round), and every rank resumes from the checkpoint."""
    spec = pretrain_spec(tmp_path / "out", nodes=2, epochs=3, checkpoint_every_steps=2)
    with cluster_env(tmp_path, extract_workers=2) as c:
        job = submit(spec, broker=c.broker)
        checkpoints = list((tmp_path / "out" / "pretrain").glob("*/last.pt"))
        deadline = time.monotonic() + 180
        while not checkpoints:
            assert time.monotonic() < deadline, job.status()
            time.sleep(0.1)
            checkpoints = list((tmp_path / "out" / "pretrain").glob("*/last.pt"))
        victims = _rank_pids(str(tmp_path))
        assert len(victims) == 2  # one rank on each node
        os.kill(victims[1], signal.SIGKILL)  # as the OOM killer would
        st = job.wait(timeout=400)
        assert st["status"] == "SUCCESS", st.get("error")
        rep = job.result()
        # the encoder, as a backbone, compared with the same architecture untrained
        board = compare(JobSpec.from_dict({
            "data": {"source": "digits", "limit": 200, "shard_size": 100},
            "backbone": {"image_size": 32}, "output": str(tmp_path / "out")}),
            [f"job:{job.id}", "resnet18:random"], broker=c.broker).wait(timeout=400)
    rows = {r["weights"]: r for r in board["rows"]}
    assert set(rows) == {f"job:{job.id}", "random"}, rows
    prep = json.loads(Path(rows[f"job:{job.id}"]["report"]).read_text())
    train = rep["train"]
    assert train["world_size"] == 2 and rep["kind"] == "pretrain" and rep["method"] == "simclr"
    regrouped = [r for r in train["resumes"] if r["reason"].startswith("a node or rank was lost")]
    assert len(regrouped) == 1 and regrouped[0]["global_step"] >= 2, train["resumes"]
    assert st["regroups"] == 1
    assert [h["epoch"] for h in train["history"]] == [1, 2, 3]
    assert train["global_step"] == 3 * train["steps_per_epoch"]
    assert all(0 < h["knn_top1"] <= 1 and 0 < h["probe_top1"] <= 1 for h in train["history"])
    # "did it help?": the initial weights and the off-the-shelf backbone, measured before
    # training, kept through the regroup's resume, compared in the report
    assert [r["role"] for r in train["reference"]] == ["initial", "off the shelf"]
    helped = rep["did_it_help"]
    assert helped["answer"] in ("ahead", "behind", "no clear difference")
    assert {r["against"] for r in helped["rows"]} == {r["encoder"] for r in train["reference"]}
    html = Path(st["report"]).with_suffix(".html").read_text()
    assert f"job:{job.id}" in html and "regrouped" in html and 'id="loss"' in html
    assert 'id="did-it-help"' in html and helped["summary"].split(":")[0] in html
    assert prep["backbone"]["weights_id"] == f"job:{job.id}"
    assert prep["backbone"]["weights_sha256"] == rep["encoder_sha256"]  # in the content key
    assert prep["backbone"]["preprocessing"]["crop"] == 32  # the pretraining's input size
    shard = read_shard(prep["shards"][0]["path"])
    assert shard.attrs["weights_sha256"] == rep["encoder_sha256"]
    assert prep["metrics"]["top1"] > 0.3


@pytest.mark.integration
@pytest.mark.faults
def test_a_killed_torchrun_agent_is_relaunched_and_the_run_resumes(tmp_path: Path) -> None:
    """SIGKILL of the node's torchrun agent alone after the first checkpoint, the node
    task's process alive: its rank dies with it (no orphan races the relaunch), the task
    starts torchrun again, the ranks resume from the checkpoint, every step runs once, the
    relaunch is in the report."""
    spec = pretrain_spec(tmp_path / "out", epochs=3, checkpoint_every_steps=3)
    with cluster_env(tmp_path, env={"CHAOS_KILL_AGENT_AFTER_CHECKPOINT": "1"}) as c:
        job = submit(spec, broker=c.broker)
        st = job.wait(timeout=400)
        assert st["status"] == "SUCCESS", st.get("error")
        rep = job.result()
    killed = json.loads((Path(st["job_dir"]) / ".chaos-agent-killed").read_text())
    assert len(killed["agents"]) == 1 and len(killed["ranks"]) == 1, killed
    assert killed["alive"] == [], killed  # no orphaned rank beside the relaunched ones
    train = rep["train"]
    lost = [r for r in train["resumes"] if r["reason"].startswith("torchrun was lost")]
    assert len(lost) == 1 and lost[0]["relaunch"] == 1, train["resumes"]
    assert (lost[0]["epoch"], lost[0]["step"]) != (0, 0)  # from the checkpoint, not step 0
    assert [h["epoch"] for h in train["history"]] == [1, 2, 3]
    assert all(h["loss"] > 0 and h["images_per_s"] > 0 for h in train["history"])
    assert train["global_step"] == 3 * train["steps_per_epoch"]
    assert st["relaunches"] == 1
    assert rep["method"] == "simclr" and rep["recipe"].startswith("pretraining (simclr)")


@pytest.mark.integration
def test_autoencoder_on_unlabeled_images(cluster: Any, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(96):  # no class folders: unlabeled
        sub = tmp_path / "imgs" / ("a" if i % 2 else "b" / Path(f"deep{i % 3}"))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(np.round(d.images[i] * 255 / 16).astype(np.uint8),
                                np.ones((2, 2), np.uint8))).save(sub / f"{i}.png")
    spec = JobSpec.from_dict({
        "kind": "pretrain", "data": {"source": "images", "path": str(tmp_path / "imgs")},
        "backbone": {"name": "resnet18", "weights": "random", "image_size": 32},
        "pretrain": {"method": "autoencoder", "epochs": 2, "batch_size": 32, "noise": 0.1,
                     "mask_fraction": 0.25},
        "output": str(tmp_path / "out")})
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=300)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    assert rep["data"]["samples_used"] == 96 and rep["data"]["eval_test"] == 0
    assert "knn_top1" not in rep["train"]["history"][-1]  # nothing labeled to evaluate on
    grid = Image.open(rep["reconstructions"])
    assert grid.size == (8 * 32, 2 * 32)
    html = Path(st["report"]).with_suffix(".html").read_text()
    assert 'id="reconstructions"' in html and "data:image/png;base64," in html


def test_bad_pretraining_input_fails_before_anything_is_enqueued(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no images.*fix:"):
        make_plan(pretrain_spec(tmp_path).replace(data={"source": "images",
                                                       "path": str(tmp_path / "empty")}), JOB)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(40):
        Image.new("RGB", (4, 4), (i, 2 * i, 0)).save(tiny / f"{i}.png")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for i in range(50):
        Image.new("RGB", (32, 32), (i, 3 * i, 100)).save(unlabeled / f"{i}.png")
    subset = make_plan(pretrain_spec(tmp_path).replace(
        data={"source": "images", "path": str(unlabeled), "limit": 40}), JOB)
    assert len(subset.splits.train) == 40 and not subset.splits.val  # data.limit holds
    with pytest.raises(DataError, match=r"as small as 4 px.*too small for random crops.*fix:"):
        make_plan(pretrain_spec(tmp_path).replace(data={"source": "images", "path": str(tiny)}),
                  JOB)
    with pytest.raises(SpecError, match=r"100 px cannot be decoded exactly"):
        make_plan(pretrain_spec(tmp_path, method="autoencoder").replace(
            backbone={"image_size": 100}), JOB)
    with pytest.raises(DataError, match=r"fewer than one batch"):
        make_plan(pretrain_spec(tmp_path, batch_size=1024).replace(data={"limit": 100}), JOB)
    probe = JobSpec.from_dict({"backbone": {"name": "job:0123456789ab"},
                               "output": str(tmp_path)})
    with pytest.raises(BackboneError, match=r"no job '0123456789ab'.*fix:"):
        make_plan(probe, JOB)
    unfinished = make_plan(pretrain_spec(tmp_path), "0123456789ab")
    unfinished.save()  # planned, never run
    with pytest.raises(BackboneError, match=r"has not finished.*featurefleet watch"):
        make_plan(probe, JOB)
    (unfinished.job_dir / "report.json").write_text(json.dumps({"kind": "classify"}))
    with pytest.raises(BackboneError, match=r"not a pretraining job"):
        make_plan(probe, JOB)


@pytest.mark.integration
def test_more_nodes_than_gpu_workers_is_refused_at_submit(cluster: Any, tmp_path: Path) -> None:
    """One worker process consumes the GPU queue: a 2-node run cannot be hosted; refused
    before anything is enqueued, with the count and the fix (nothing waits for minutes)."""
    with pytest.raises(SpecError, match=r"'pretrain.nodes': 2 nodes, but 1 worker process.*"
                                        r"fix: start 1 more.*at most 1"):
        submit(pretrain_spec(tmp_path / "out", nodes=2), broker=cluster.broker)
    ft = JobSpec.from_dict({"data": {"source": "digits", "limit": 100}, "strategy": "finetune",
                            "finetune": {"nodes": 3}, "output": str(tmp_path / "out")})
    with pytest.raises(SpecError, match=r"'finetune.nodes': 3 nodes, but 1 worker"):
        submit(ft, broker=cluster.broker)
    assert not list((tmp_path / "out" / "jobs").glob("*/plan.json"))  # nothing enqueued


def test_the_plan_says_whether_pretraining_continues_from_pretrained_weights(
        tmp_path: Path) -> None:
    from pipeline.planner import make_plan

    base = JobSpec.from_dict({"kind": "pretrain", "data": {"source": "digits", "limit": 300},
                              "backbone": {"name": "efficientnet_lite0", "image_size": 32},
                              "output": str(tmp_path)})
    continued = make_plan(base, "a" * 12)
    assert "continued from IMAGENET1K_V1 at learning rate 0.001" in continued.strategy_reason
    scratch = make_plan(base.replace(backbone={"weights": "random"}), "b" * 12)
    assert "from random initialisation" in scratch.strategy_reason
    # epochs: auto -> about 1,000 optimizer steps, within 10-400 epochs, said in the plan
    assert continued.spec.pretrain.epochs == 400  # < 256 images: 1 step an epoch, capped
    whole = make_plan(base.replace(data={"limit": None}), "d" * 12)
    used = len(whole.splits.train) + len(whole.splits.val)
    want = round(1000 / (used // 128))
    assert 10 < want < 400 and whole.spec.pretrain.epochs == want
    assert (f"{want} epochs (auto: about 1,000 optimizer steps of 128 images over {used:,} "
            f"images, {used // 128} per epoch") in whole.strategy_reason
    fixed = make_plan(base.replace(pretrain={"epochs": 7, "method": "byol"}), "c" * 12)
    assert fixed.spec.pretrain.epochs == 7 and "pretraining (byol)" in fixed.strategy_reason
    assert "7 epochs (7 optimizer steps)" in fixed.strategy_reason
    from pipeline.spec import PretrainSpec

    assert PretrainSpec().epochs_for(1_000_000) == 10  # large data: at least 10 epochs
    assert PretrainSpec().epochs_for(200) == 400  # one step an epoch: at most 400


def test_blur_and_solarize_reach_the_views() -> None:
    """pretrain.blur / solarize change what the network sees (the same draws otherwise), and
    the blur keeps an image's mean brightness."""
    from pipeline.backbones import Preprocessing
    from pipeline.preprocess import _blur
    from pipeline.pretrain.views import simclr
    from pipeline.spec import PretrainSpec

    pre = Preprocessing(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(4)]

    def first_view(**kw: Any) -> torch.Tensor:
        return simclr(images, pre, "cpu", torch.Generator().manual_seed(0),
                      PretrainSpec(hflip=False, color_jitter=0.0, grayscale=0.0, **kw))[0]

    plain = first_view()
    assert torch.equal(plain, first_view())
    assert not torch.allclose(plain, first_view(blur=1.0))
    assert not torch.allclose(plain, first_view(solarize=1.0))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    blurred = _blur(x, torch.Generator().manual_seed(1), 1.0)
    assert blurred.std() < x.std()  # smoother
    assert float((blurred.mean() - x.mean()).abs()) < 2.0  # same brightness (0..255)
