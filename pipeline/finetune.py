"""End-to-end fine-tuning: the pretrained backbone + a new linear head, trained on the images.

Same splits as the probe (train/val carved with the data seed, test untouched until the end),
so the two strategies are compared on the same images. One training run is resumable: the
checkpoint ``<job>/finetune/last.pt`` (model, optimizer, scheduler, epoch, step in epoch, RNG
states, history) is written atomically every epoch and every ``checkpoint_every_steps``; a task
that is killed and delivered again continues from it, and the report lists each resume. The
epoch's sample order comes from the seed and the epoch number, so a resumed epoch skips exactly
the batches already done. ``best.pt`` keeps the weights of the best validation epoch; test is
evaluated once, on those.

On CUDA: bf16 autocast, channels_last. Augmentation: random resized crop (one batched
``roi_align`` call: crop + resize with fractional boxes, antialiased by its sampling) and an
optional horizontal flip.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import backbones, evaluate
from pipeline.devices import decode_threads, decoded, pick_device
from pipeline.engine import loop
from pipeline.engine.dist import Rank
from pipeline.errors import BackboneError
from pipeline.fsio import atomic_path, atomic_write_text
from pipeline.heads import load_tensors
from pipeline.plan import BackboneInfo, Splits
from pipeline.preprocess import augment, preprocess
from pipeline.sources import Source
from pipeline.spec import FinetuneSpec

log = logging.getLogger(__name__)


def build_network(name: str, weights: str | None, n_classes: int, device: str,
                  pre: backbones.AnyPreprocessing | None = None) -> Any:
    """Backbone + a new linear head as one trainable ``torch.nn.Module`` (and the backbone);
    ``pre``: the job's preprocessing (a text encoder's token limit)."""
    import torch

    bb = backbones.load_backbone(name, weights, "cpu")
    if pre is not None:
        backbones.use_preprocessing(bb.model, pre)

    class FinetuneNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = bb.model
            self.head = torch.nn.Linear(bb.feature_dim, n_classes)

        def forward(self, x: torch.Tensor) -> Any:
            return self.head(self.backbone(x))

    net = FinetuneNet().requires_grad_(True)
    for m in net.modules():
        # Some ports keep TF's BN momentum (0.01): running statistics would then still be
        # ImageNet's after a short fine-tune, and eval mode would see the wrong ones.
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            m.momentum = max(m.momentum, 0.1)
    return net.to(device).to(memory_format=torch.channels_last), bb


def save_main(obj: Any, path: Path) -> None:
    """Write ``obj`` atomically (rank 0 only calls it)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def predict_proba(net: Any, source: Source, indices: Sequence[int], pre: Any, device: str,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                            list[tuple[str, str]]]:
    """Class probabilities for ``indices`` (center crop, eval mode); labels; the sample indices
    evaluated; skipped samples."""
    import torch

    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    net.eval()
    use_amp = device.startswith("cuda")
    with torch.inference_mode():
        for loaded in decoded(source, indices, batch_size, decode_threads(device)):
            skipped.extend((source.sample_id(i), why) for i, why in loaded.failures)
            if not loaded.images:
                continue
            batch = preprocess(loaded.images, pre, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = net(batch)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(source.labels[np.asarray(loaded.indices)])
            kept.extend(loaded.indices)
    n_classes = len(source.class_names)
    return (np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.asarray(kept, np.int64), skipped)


class Program:
    """Fine-tuning as a program of the engine's loop: backbone + head, cross-entropy on the
    (augmented) images; after each epoch rank 0 validates and keeps the best weights."""

    def __init__(self, rank: Rank, source: Source, splits: Splits, class_names: list[str],
                 backbone: BackboneInfo, ft: FinetuneSpec, seed: int, out_dir: Path) -> None:
        import torch

        torch.manual_seed(seed)
        self.rank, self.source, self.splits, self.ft = rank, source, splits, ft
        self.class_names, self.backbone = class_names, backbone
        self.best_path = out_dir / "best.pt"
        self.pre = backbones.preprocessing_from_dict(backbone.preprocessing)
        self.net, _bb = build_network(backbone.name, backbone.weights, len(class_names),
                                      rank.device, self.pre)
        self.model = rank.wrap(self.net)
        groups = [{"params": list(self.net.backbone.parameters()),
                   "lr": ft.lr * ft.backbone_lr_mult},
                  {"params": list(self.net.head.parameters()), "lr": ft.lr}]
        if ft.optimizer == "sgd":
            self.optimizer: Any = torch.optim.SGD(groups, lr=ft.lr, momentum=0.9,
                                                  nesterov=True, weight_decay=ft.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=ft.lr, weight_decay=ft.weight_decay)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)
        self.extra: dict[str, Any] = {"best_val": -1.0, "best_epoch": None, "trained_on": [],
                                      "val_ids": []}

    def step(self, batch: loop.Batch) -> Any:
        import torch

        if batch.epoch == 0:  # every epoch draws from the same samples: record them once
            self.extra["trained_on"].extend(sorted(set(batch.indices.tolist())))
        ft, device = self.ft, self.rank.device
        x = augment(batch.samples, self.pre, device, batch.generator, ft.crop_scale_min,
                    ft.hflip) if ft.augment else preprocess(batch.samples, self.pre, device)
        y = torch.as_tensor(self.source.labels[batch.indices], device=device)
        return self.loss_fn(self.model(x).float(), y)

    def evaluate(self, epoch: int) -> dict[str, Any]:
        proba, yv, val_ids, _ = predict_proba(self.net, self.source, self.splits.val, self.pre,
                                              self.rank.device, max(2, self.ft.batch_size //
                                                                    self.rank.world_size))
        self.extra["val_ids"] = val_ids.tolist()
        val_top1 = float((proba.argmax(1) == yv).mean()) if len(yv) else 0.0
        if val_top1 > self.extra["best_val"]:
            self.extra["best_val"], self.extra["best_epoch"] = val_top1, epoch + 1
            save_main({"model": self.net.state_dict(), "meta": json.dumps({
                "backbone": self.backbone.name, "weights": self.backbone.weights,
                "n_classes": len(self.class_names), "class_names": self.class_names,
                "epoch": epoch + 1, "val_top1": val_top1,
                "preprocessing": self.pre.to_dict()})}, self.best_path)
        return {"val_top1": round(val_top1, 5)}


def run(rank: Rank, source: Source, splits: Splits, class_names: list[str],
        backbone: BackboneInfo, ft: FinetuneSpec, *, seed: int, how: loop.Slice,
        splits_file: Path | None = None) -> dict[str, Any]:
    """Fine-tune in this rank on the engine's loop (resuming from ``how.out_dir/last.pt``);
    return small JSON with the best checkpoint, the per-epoch history and the resumes (rank
    0's is kept), or ``{"continue": True}`` / ``{"cancelled": True}`` when the slice ends or
    the job is cancelled. ``splits_file``: where rank 0 writes the train and val sample ids
    actually used.

    Raises:
        JobError: fewer training samples than one batch.
    """
    program = Program(rank, source, splits, class_names, backbone, ft, seed, how.out_dir)
    cfg = loop.LoopConfig(epochs=ft.epochs, batch_size=ft.batch_size, seed=seed,
                          warmup_fraction=ft.warmup_fraction,
                          checkpoint_every_steps=ft.checkpoint_every_steps,
                          bf16=backbone.precision == "bf16", batch_field="finetune.batch_size")
    threads = decode_threads(rank.device)
    out = loop.run(rank, program, splits.train, cfg, how,
                   lambda ids, n: decoded(source, ids, n, threads), source.sample_id)
    if not out.done:
        return {out.state: True, "epoch": out.record["epoch"], "step": out.record["step"]}
    extra = program.extra
    if splits_file is not None and rank.is_main:  # the samples used: drawn and decoded
        atomic_write_text(splits_file, json.dumps({"train": sorted(set(extra["trained_on"])),
                                                   "val": extra["val_ids"]}), fsync=False)
    return {**loop.summary(out, rank), "best": str(program.best_path),
            "checkpoint": str(how.out_dir / "last.pt"), "best_epoch": extra["best_epoch"],
            "best_val_top1": extra["best_val"], "epochs": ft.epochs,
            "train_images": len(splits.train), "val_images": len(splits.val),
            "params": int(sum(p.numel() for p in program.net.parameters()))}


def load_network(best: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The fine-tuned network from ``best.pt`` (safe load), in eval mode, and its metadata."""
    raw = load_tensors(best, "fine-tuned network (best.pt)", "pass the folder of a finished "
                       "fine-tuning job, or its finetune/best.pt")
    meta = json.loads(raw["meta"])
    net, _ = build_network(meta["backbone"], backbones.RANDOM, meta["n_classes"], device,
                           backbones.preprocessing_from_dict(meta["preprocessing"]))
    net.load_state_dict(raw["model"])
    return net.eval(), meta


def evaluate_test(source: Source, test_ids: Sequence[int], class_names: list[str], best: str,
                  ft: FinetuneSpec) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Test metrics of the best epoch's network (the test split is used only here), with the
    per-sample probabilities and the sample indices evaluated."""
    device = pick_device(ft.device)
    net, meta = load_network(best, device)
    pre = backbones.preprocessing_from_dict(meta["preprocessing"])
    proba, y, ids, skipped = predict_proba(net, source, test_ids, pre, device, ft.batch_size)
    metrics = evaluate.classification_metrics(y, proba, class_names)
    return {**metrics, "skipped_test": [{"id": i, "reason": r} for i, r in skipped]}, proba, ids


def export_for_features(best: str | Path) -> Path:
    """A fine-tuned image network split for batch prediction on cached features: its backbone
    as a weights file (``encoder.pt``, what ``backbone.weights: <path>`` loads) and its last
    layer as a linear head (``head.pt`` beside it, whose metadata names that backbone). Done
    once per ``best.pt`` (written atomically; reused while ``best.pt`` is unchanged); returns
    the head's path.

    Raises:
        BackboneError: a text encoder (its fine-tuned weights are not a state dict that a
            backbone name loads), or a network whose backbone does not fit its architecture.
    """
    from pipeline.heads import load_head
    from pipeline.heads.linear import LinearHead
    from pipeline.pretrain.models import export_encoder

    best = Path(best)
    head_path, encoder_path = best.with_name("head.pt"), best.with_name("encoder.pt")
    digest = backbones.sha256_of(best)
    if head_path.is_file() and encoder_path.is_file():
        with contextlib.suppress(Exception):
            if load_head(head_path).meta.get("exported_from") == digest:
                return head_path
    net, meta = load_network(best)
    pre = backbones.preprocessing_from_dict(meta["preprocessing"])
    if pre.modality != "image":
        raise BackboneError(
            f"a fine-tuned {pre.modality} encoder cannot be split into stored features + a "
            f"head; fix: predict with featurefleet predict {best.parent.parent} "
            + ("--text-file FILE" if pre.modality == "text" else "CLIP.wav ..."))
    weights_sha = export_encoder(net.backbone, meta["backbone"], encoder_path)
    weight = net.head.weight.detach().float().cpu().numpy()
    LinearHead(mean=np.zeros(weight.shape[1], np.float32),
               scale=np.ones(weight.shape[1], np.float32), weight=weight,
               bias=net.head.bias.detach().float().cpu().numpy(),
               meta={"backbone": meta["backbone"], "weights": str(encoder_path),
                     "weights_sha256": weights_sha, "preprocessing": meta["preprocessing"],
                     "class_names": meta["class_names"], "exported_from": digest}
               ).save(head_path)
    return head_path
