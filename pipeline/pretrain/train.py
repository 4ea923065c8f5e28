"""The pretraining program, run by every rank on the engine's loop
(:mod:`pipeline.engine.loop`: seeded batches, schedule, checkpoints, resume, time slices).

The program supplies the networks (encoder + decoder, projection head, or BYOL's online and
momentum target networks), one step (SimCLR's NT-Xent on two views gathered across ranks,
BYOL's prediction of the target's view, or the autoencoder's reconstruction error; labels
never used) and the online evaluation: every ``eval_every_epochs`` rank 0 measures the
encoder on the labeled evaluation samples (kNN and linear-probe top-1), when there are labels,
and before training measures the same for the initial weights and for the off-the-shelf
ImageNet backbone a user would otherwise probe — the report's "did it help?".
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
from pipeline.errors import BackboneError
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
        self.optimizer = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad],
                                           lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.extra: dict[str, Any] = {}

    def step(self, batch: loop.Batch) -> Any:
        import torch

        images, device, cfg = batch.samples, self.rank.device, self.cfg
        if cfg.method == "simclr":
            v1, v2 = views.simclr(images, self.how.pre, device, batch.generator, cfg)
            z = self.model(torch.cat([v1, v2]))
            return objectives.nt_xent(z[:len(images)], z[len(images):], self.rank,
                                      cfg.temperature)
        if cfg.method == "byol":
            v1, v2 = views.simclr(images, self.how.pre, device, batch.generator, cfg)
            return objectives.byol(*self.model(torch.cat([v1, v2])))
        x, target = views.autoencoder(images, self.how.pre, device, batch.generator, cfg)
        return objectives.reconstruction(self.model(x), target)

    def after_step(self, global_step: int, total_steps: int) -> None:
        """BYOL: move the target network towards the online one (momentum rising to 1)."""
        if self.cfg.method == "byol":
            self.net.update_target(models.target_momentum(self.cfg.momentum, global_step,
                                                          total_steps))

    def evaluate(self, epoch: int) -> dict[str, Any]:
        every, epochs = self.cfg.eval_every_epochs, self.cfg.epochs_for(len(self.data.train))
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
    if rank.is_main and cfg.eval_every_epochs and not (how.out_dir / "last.pt").exists():
        program.extra["reference"] = references(program.net.encoder, data, enc, rank.device)
    conf = loop.LoopConfig(epochs=cfg.epochs_for(len(data.train)), batch_size=cfg.batch_size,
                           seed=enc.seed,
                           warmup_fraction=cfg.warmup_fraction,
                           checkpoint_every_steps=cfg.checkpoint_every_steps, bf16=True,
                           batch_field="pretrain.batch_size")
    threads = 1 if rank.device == "cpu" else 4
    out = loop.run(rank, program, data.train, conf, how,
                   lambda ids, n: decoded(data.source, ids, n, threads),
                   data.source.sample_id)
    if not out.done:
        return {out.state: True}
    summary: dict[str, Any] = {**loop.summary(out, rank), "feature_dim": program.dim,
                               "reference": program.extra.get("reference", [])}
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


def references(encoder: Any, data: Data, enc: Encoder, device: str) -> list[dict[str, Any]]:
    """What the encoder is measured against (before training; empty without labels): its
    initial weights, and the off-the-shelf ImageNet backbone a user would otherwise probe
    (the default backbone, at the same input size) unless that is what training starts from.
    A reference that cannot be loaded here (no internet for its weights) says so."""
    import torch

    from pipeline.backbones import load_backbone, resolve_weights
    from pipeline.spec import BackboneSpec

    if not data.eval_test:
        return []
    default = BackboneSpec()
    try:
        start = resolve_weights(enc.arch, enc.weights).id
        info = resolve_weights(default.name, default.weights)
    except BackboneError:
        start, info = str(enc.weights or "random"), None
    rows = [{"encoder": f"{enc.arch}, initial weights ({start})", "role": "initial",
             **evaluate(encoder, data, enc.pre, device)}]
    if info is not None and (enc.arch, start) == (default.name, info.id):
        rows[0]["role"] = "initial, off the shelf"
        rows[0]["encoder"] = f"{default.name} ({info.id}): the initial weights, off the shelf"
        return rows
    try:
        if info is None:
            raise BackboneError(f"{default.name}'s weights cannot be identified")
        state = torch.random.get_rng_state()
        bb = load_backbone(default.name, default.weights, device)
        torch.random.set_rng_state(state)  # the run's own draws stay as they were
        pre = info.preprocessing
        assert isinstance(pre, Preprocessing)  # the default backbone is an image network
        pre = pre.scaled_to(enc.pre.crop)
        rows.append({"encoder": f"{default.name} ({info.id}), off the shelf",
                     "role": "off the shelf", **evaluate(bb.model, data, pre, device)})
    except (BackboneError, OSError, RuntimeError) as exc:  # reported, not fatal
        rows.append({"encoder": f"{default.name}, off the shelf", "role": "off the shelf",
                     "note": f"not measured: {exc}"})
    return rows


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
    near = knn.KNNHead(knn.l2norm(xtr), ytr, min(20, len(ytr)), k)  # float32: trained
    # features can share one dominant direction, which float16 would round away
    probe = linear.fit_probe(xtr, ytr, k, l2=1e-3, max_iter=300)
    return {"knn_top1": round(float((near.predict_proba(xte).argmax(1) == yte).mean()), 5),
            "probe_top1": round(float((probe.predict_proba(xte).argmax(1) == yte).mean()), 5)}
