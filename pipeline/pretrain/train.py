"""The pretraining program, run by every rank of the engine.

Each epoch draws a seeded permutation of the pretraining samples (labels never used), cut
into global batches; each rank decodes and trains on its share, DDP averages the gradients.
``last.pt`` (model, optimizer, scheduler, RNG, epoch, step, history) is written by rank 0 every
epoch and every ``checkpoint_every_steps``; a rank restarted by torchrun, a task delivered
again, or the next time slice resumes from it and skips exactly the batches already done. The
report lists every resume. Every ``eval_every_epochs`` rank 0 measures the encoder on the
labeled evaluation samples (kNN and linear-probe top-1), when the data has labels.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import Preprocessing
from pipeline.devices import decoded
from pipeline.engine import dist
from pipeline.engine.dist import Rank
from pipeline.pretrain import models, objectives, views
from pipeline.sources import Loaded, Source
from pipeline.spec import PretrainSpec

Progress = Callable[[dict[str, Any]], None]


@dataclass
class Data:
    """What the program trains and evaluates on (sample indices into ``source``)."""

    source: Source
    train: list[int]  # pretraining samples (labels hidden)
    eval_train: list[int] = field(default_factory=list)  # labeled, for the online probes
    eval_test: list[int] = field(default_factory=list)


@dataclass
class Run:
    """Where this run writes and how it was started."""

    out_dir: Path
    arch: str
    weights: str | None
    pre: Preprocessing
    seed: int
    attempt: int = 1  # starts of this time slice's task (> 1: delivered again)
    part: int = 0  # time slice
    slice_s: float | None = None  # train this long (from the first step), then checkpoint, stop
    should_stop: Callable[[], bool] = lambda: False  # the job was cancelled


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _fill(loaded: Loaded, n: int) -> list[np.ndarray]:
    """``n`` images from a batch whose unreadable samples were dropped (repeating readable
    ones): every rank must contribute the same number to the gathered batch."""
    images = loaded.images
    if not images:
        return []
    return [images[i % len(images)] for i in range(n)]


def run(rank: Rank, data: Data, cfg: PretrainSpec, how: Run,
        progress: Progress | None = None) -> dict[str, Any]:
    """Pretrain (resuming from ``last.pt``); return the summary (rank 0's is the one kept), or
    ``{"continue": True}`` past the deadline, ``{"cancelled": True}`` when stopped."""
    import torch

    last_path = how.out_dir / "last.pt"
    crop = how.pre.crop
    net, dim = models.build(cfg.method, how.arch, how.weights, crop, cfg.projection_dim,
                            rank.device)
    model = rank.wrap(net)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = cfg.batch_size // rank.world_size
    steps_per_epoch = len(data.train) // (per_rank * rank.world_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, max(1, round(
        cfg.warmup_fraction * total))))
    gen = torch.Generator().manual_seed(how.seed * 1000 + rank.rank)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "global_step": 0, "history": [],
                             "resumes": [], "train_seconds": 0.0, "images": 0}
    ckpt = dist.load(last_path)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = json.loads(ckpt["state"])
        gen.manual_seed(how.seed * 1000 + rank.rank + 7919 * (state["global_step"] + 1))
        state["resumes"].append({"reason": dist.resume_reason(rank, how.attempt, how.part),
                                 "attempt": how.attempt,
                                 "restart": rank.restart, "part": how.part,
                                 "epoch": state["epoch"], "step": state["step"],
                                 "global_step": state["global_step"], "at": time.time()})

    def checkpoint() -> None:
        dist.save(rank, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "state": json.dumps(state)},
                  last_path)

    amp = rank.device.startswith("cuda")
    t_start, reported = time.perf_counter(), 0.0
    deadline = None if how.slice_s is None else time.time() + how.slice_s
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        order = np.random.default_rng([how.seed, epoch]).permutation(data.train)
        batches = [order[b * per_rank * rank.world_size:(b + 1) * per_rank * rank.world_size]
                   for b in range(steps_per_epoch)]
        mine = [int(i) for b in batches[state["step"]:] for i in rank.split(list(b))]
        model.train()
        loss_sum, seen, t_epoch = 0.0, 0, time.perf_counter()
        for loaded in decoded(data.source, mine, per_rank, 1 if rank.device == "cpu" else 4):
            images = _fill(loaded, per_rank)
            if len(images) < 2:
                raise RuntimeError(f"a batch of {per_rank} samples had no readable image")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                if cfg.method == "simclr":
                    v1, v2 = views.simclr(images, how.pre, rank.device, gen, cfg)
                    z = model(torch.cat([v1, v2]))
                    loss = objectives.nt_xent(z[:len(images)], z[len(images):], rank,
                                              cfg.temperature)
                else:
                    x, target = views.autoencoder(images, how.pre, rank.device, gen, cfg)
                    loss = objectives.reconstruction(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(images)
            seen += len(images)
            state["step"] += 1
            state["global_step"] += 1
            state["images"] += len(images) * rank.world_size
            if rank.is_main and progress is not None and (
                    time.perf_counter() - reported > 1.0 or state["step"] == steps_per_epoch):
                reported = time.perf_counter()
                progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": state["step"],
                          "steps": steps_per_epoch, "loss": round(loss_sum / max(seen, 1), 5),
                          "images_per_s": round(seen * rank.world_size / max(
                              time.perf_counter() - t_epoch, 1e-6), 1)})
            late = deadline is not None and time.time() > deadline
            if rank.any(late or how.should_stop()):
                state["train_seconds"] += time.perf_counter() - t_start
                checkpoint()
                return {"cancelled": True} if how.should_stop() else {"continue": True}
            n = cfg.checkpoint_every_steps
            if n and state["step"] % n == 0 and state["step"] < steps_per_epoch:
                state["train_seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                checkpoint()
        epoch_s = time.perf_counter() - t_epoch
        row: dict[str, Any] = {"epoch": epoch + 1,
                               "loss": round(rank.mean(loss_sum / max(seen, 1)), 5),
                               "images_per_s": round(seen * rank.world_size / epoch_s, 1)}
        if cfg.eval_every_epochs and data.eval_test and (
                (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs):
            if rank.is_main:
                row.update(evaluate(net.encoder, data, how.pre, rank.device))
            rank.barrier()
        state["history"].append(row)
        state["epoch"], state["step"] = epoch + 1, 0
        state["train_seconds"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        checkpoint()
    summary: dict[str, Any] = {"history": state["history"], "resumes": state["resumes"],
                               "seconds": round(state["train_seconds"], 3),
                               "images": state["images"], "feature_dim": dim,
                               "steps_per_epoch": steps_per_epoch,
                               "global_step": state["global_step"],
                               "world_size": rank.world_size, "device": rank.device}
    if rank.is_main:
        summary["encoder"] = str(how.out_dir / "encoder.pt")
        summary["encoder_sha256"] = models.export_encoder(net.encoder, how.arch,
                                                          how.out_dir / "encoder.pt")
        if cfg.method == "autoencoder":
            summary["reconstructions"] = str(views.reconstruction_grid(
                net, data, how.pre, rank.device, how.out_dir / "reconstructions.png"))
    rank.barrier()
    return summary


def features(encoder: Any, source: Source, ids: Sequence[int], pre: Preprocessing,
             device: str, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's pooled features and the labels of ``ids`` (eval mode, center crop)."""
    import torch

    from pipeline.preprocess import preprocess

    was = encoder.training
    encoder.eval()
    feats, labels = [], []
    with torch.inference_mode():
        for loaded in decoded(source, list(ids), batch, 1):
            if loaded.images:
                feats.append(encoder(preprocess(loaded.images, pre, device)).float().cpu()
                             .numpy())
                labels.append(source.labels[np.asarray(loaded.indices)])
    encoder.train(was)
    return (np.concatenate(feats) if feats else np.zeros((0, 1), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64))


def evaluate(encoder: Any, data: Data, pre: Preprocessing, device: str) -> dict[str, float]:
    """kNN (cosine, k=20) and linear-probe top-1 of the encoder's features on the labeled
    evaluation samples: what the representation is worth, as it trains."""
    from pipeline.heads import knn, linear

    xtr, ytr = features(encoder, data.source, data.eval_train, pre, device)
    xte, yte = features(encoder, data.source, data.eval_test, pre, device)
    k = len(data.source.class_names)
    if len(ytr) == 0 or len(yte) == 0:
        return {}
    near = knn.KNNHead(knn.l2norm(xtr).astype(np.float16), ytr, min(20, len(ytr)), k)
    probe = linear.fit_probe(xtr, ytr, k, l2=1e-3, max_iter=300)
    return {"knn_top1": round(float((near.predict_proba(xte).argmax(1) == yte).mean()), 5),
            "probe_top1": round(float((probe.predict_proba(xte).argmax(1) == yte).mean()), 5)}
