"""The pretraining program, run by every rank on the engine's loop
(:mod:`pipeline.engine.loop`: seeded batches, schedule, checkpoints, resume, time slices).

The program supplies the networks (encoder + decoder or projection head), one step (SimCLR's
NT-Xent on two views gathered across ranks, or the autoencoder's reconstruction error;
labels never used) and the online evaluation: every ``eval_every_epochs`` rank 0 measures the
encoder on the labeled evaluation samples (kNN and linear-probe top-1), when there are labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.backbones import Preprocessing
from pipeline.devices import decoded
from pipeline.engine import loop
from pipeline.engine.dist import Rank
from pipeline.pretrain import models, objectives, views
from pipeline.sources import Source
from pipeline.spec import PretrainSpec


@dataclass
class Data:
    """What the program trains and evaluates on (sample indices into ``source``)."""

    source: Source
    train: list[int]  # pretraining samples (labels hidden)
    eval_train: list[int] = field(default_factory=list)  # labeled, for the online probes
    eval_test: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Encoder:
    """The encoder to pretrain: architecture, initial weights, input, seed."""

    arch: str
    weights: str | None
    pre: Preprocessing
    seed: int


class Program:
    """Pretraining as a program of the engine's loop: SimCLR's NT-Xent on two views (gathered
    across ranks) or the autoencoder's reconstruction error; every ``eval_every_epochs`` rank 0
    measures the encoder on the labeled evaluation samples."""

    def __init__(self, rank: Rank, data: Data, cfg: PretrainSpec, how: Encoder) -> None:
        import torch

        torch.manual_seed(how.seed)  # the initial weights (a resumed run loads its own)
        self.rank, self.data, self.cfg, self.how = rank, data, cfg, how
        self.net, self.dim = models.build(cfg.method, how.arch, how.weights, how.pre.crop,
                                          cfg.projection_dim, rank.device)
        self.model = rank.wrap(self.net)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.extra: dict[str, Any] = {}

    def step(self, batch: loop.Batch) -> Any:
        import torch

        images, device, cfg = batch.samples, self.rank.device, self.cfg
        if cfg.method == "simclr":
            v1, v2 = views.simclr(images, self.how.pre, device, batch.generator, cfg)
            z = self.model(torch.cat([v1, v2]))
            return objectives.nt_xent(z[:len(images)], z[len(images):], self.rank,
                                      cfg.temperature)
        x, target = views.autoencoder(images, self.how.pre, device, batch.generator, cfg)
        return objectives.reconstruction(self.model(x), target)

    def evaluate(self, epoch: int) -> dict[str, Any]:
        every, epochs = self.cfg.eval_every_epochs, self.cfg.epochs
        if not every or not self.data.eval_test or not (
                (epoch + 1) % every == 0 or epoch + 1 == epochs):
            return {}
        return evaluate(self.net.encoder, self.data, self.how.pre, self.rank.device)


def run(rank: Rank, data: Data, cfg: PretrainSpec, enc: Encoder,
        how: loop.Slice) -> dict[str, Any]:
    """Pretrain on the engine's loop (resuming from ``how.out_dir/last.pt``); return the
    summary (rank 0's is the one kept), or ``{"continue": True}`` past the deadline,
    ``{"cancelled": True}`` when stopped."""
    program = Program(rank, data, cfg, enc)
    conf = loop.LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=enc.seed,
                           warmup_fraction=cfg.warmup_fraction,
                           checkpoint_every_steps=cfg.checkpoint_every_steps, bf16=True,
                           batch_field="pretrain.batch_size")
    threads = 1 if rank.device == "cpu" else 4
    out = loop.run(rank, program, data.train, conf, how,
                   lambda ids, n: decoded(data.source, ids, n, threads),
                   data.source.sample_id)
    if not out.done:
        return {out.state: True}
    summary: dict[str, Any] = {**loop.summary(out, rank), "feature_dim": program.dim}
    if rank.is_main:
        net = program.net
        summary["encoder"] = str(how.out_dir / "encoder.pt")
        summary["encoder_sha256"] = models.export_encoder(net.encoder, enc.arch,
                                                          how.out_dir / "encoder.pt")
        if cfg.method == "autoencoder":
            summary["reconstructions"] = str(views.reconstruction_grid(
                net, data, enc.pre, rank.device, how.out_dir / "reconstructions.png"))
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
