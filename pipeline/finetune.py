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

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import backbones, evaluate
from pipeline.devices import decode_threads, decoded, pick_device
from pipeline.engine.dist import Rank, load, resume_reason, save
from pipeline.errors import JobError
from pipeline.fsio import atomic_path, atomic_write_text
from pipeline.plan import BackboneInfo, Splits
from pipeline.preprocess import augment, preprocess
from pipeline.sources import Source
from pipeline.spec import FinetuneSpec

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
CHECKPOINT_SCHEMA = 1


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


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


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


def run(rank: Rank, source: Source, splits: Splits, class_names: list[str],
        backbone: BackboneInfo, ft: FinetuneSpec, *, seed: int, out_dir: Path, job_id: str,
        attempt: int = 1, part: int = 0, progress: Progress | None = None,
        slice_s: float | None = None, should_stop: Callable[[], bool] = lambda: False,
        splits_file: Path | None = None) -> dict[str, Any]:
    """Fine-tune in this rank (resuming from ``out_dir/last.pt`` when present); return small
    JSON with the best checkpoint, the per-epoch history and the resumes (rank 0's is kept).

    Each global batch of ``finetune.batch_size`` is split across the ranks (DDP averages the
    gradients). After ``slice_s`` seconds of training, or when ``should_stop()`` turns true on
    rank 0, every rank stops after checkpointing and ``{"continue": True}`` (or
    ``{"cancelled": True}``) is returned. ``splits_file``: where rank 0 writes the train and
    val sample ids actually used.

    Raises:
        JobError: fewer training samples than one batch.
    """
    import torch

    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    device = rank.device
    n_classes = len(class_names)
    torch.manual_seed(seed)
    pre = backbones.preprocessing_from_dict(backbone.preprocessing)
    net, _bb = build_network(backbone.name, backbone.weights, n_classes, device, pre)
    model = rank.wrap(net)
    head_params = list(net.head.parameters())
    body_params = list(net.backbone.parameters())
    groups = [{"params": body_params, "lr": ft.lr * ft.backbone_lr_mult},
              {"params": head_params, "lr": ft.lr}]
    if ft.optimizer == "sgd":
        opt: Any = torch.optim.SGD(groups, lr=ft.lr, momentum=0.9, nesterov=True,
                                   weight_decay=ft.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=ft.lr, weight_decay=ft.weight_decay)
    train_idx = np.asarray(splits.train, np.int64)
    per_rank = ft.batch_size // rank.world_size
    steps_per_epoch = len(train_idx) // max(1, per_rank * rank.world_size)
    if steps_per_epoch == 0 or per_rank < 2:
        raise JobError(f"job {job_id}: {len(train_idx)} training samples are fewer than "
                       f"finetune.batch_size {ft.batch_size}, or the batch leaves fewer than "
                       f"2 per rank over {rank.world_size} ranks; fix: lower "
                       "finetune.batch_size or finetune.nodes")
    total = steps_per_epoch * ft.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(total, max(1, round(ft.warmup_fraction * total))))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)
    gen = torch.Generator().manual_seed(seed + 1 + 1000 * rank.rank)

    state: dict[str, Any] = {"epoch": 0, "step": 0, "global_step": 0, "best_val": -1.0,
                             "best_epoch": None, "history": [], "resumes": [],
                             "train_seconds": 0.0, "skipped": [], "trained_on": [],
                             "val_ids": []}
    ckpt = load(last_path)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = json.loads(ckpt["state"])
        gen.manual_seed(seed + 1 + 1000 * rank.rank + 7919 * (state["global_step"] + 1))
        state["resumes"].append({"reason": resume_reason(rank, attempt, part),
                                 "attempt": attempt, "restart": rank.restart, "part": part,
                                 "epoch": state["epoch"], "step": state["step"],
                                 "global_step": state["global_step"], "at": time.time()})
        log.warning("job %s: fine-tuning resumes at epoch %d step %d (attempt %d)",
                    job_id, state["epoch"], state["step"], attempt)

    def checkpoint() -> None:
        save(rank, {"schema": CHECKPOINT_SCHEMA, "model": net.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "state": json.dumps(state)}, last_path)

    # bf16 autocast on CUDA (fp16 would need loss scaling: it trains in fp32 instead)
    use_amp = device.startswith("cuda") and backbone.precision == "bf16"
    threads = decode_threads(device)
    t_start = time.perf_counter()
    deadline = None if slice_s is None else time.time() + slice_s
    while state["epoch"] < ft.epochs:
        epoch = state["epoch"]
        order = np.random.default_rng([seed, epoch]).permutation(train_idx)
        global_b = per_rank * rank.world_size
        batches = [order[b * global_b:(b + 1) * global_b] for b in range(steps_per_epoch)]
        mine = [int(i) for b in batches[state["step"]:] for i in rank.split(list(b))]
        model.train()
        seen, loss_sum, t_epoch = 0, 0.0, time.perf_counter()
        for loaded in decoded(source, mine, per_rank, threads):
            state["skipped"].extend(source.sample_id(i) for i, _ in loaded.failures)
            images, labels = loaded.images, list(loaded.indices)
            if epoch == 0:  # every epoch draws from the same samples: record them once
                state["trained_on"].extend(int(i) for i in labels)
            if len(images) < 2:  # DDP needs every rank in every step: train on what decoded
                images = [images[0]] * 2 if images else []
                labels = [labels[0]] * 2 if labels else []
            if images:
                x = augment(images, pre, device, gen, ft.crop_scale_min, ft.hflip) \
                    if ft.augment else preprocess(images, pre, device)
                y = torch.as_tensor(source.labels[np.asarray(labels)], device=device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    loss = loss_fn(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
            sched.step()
            state["step"] += 1
            state["global_step"] += 1
            if progress is not None and rank.is_main:
                rate = seen * rank.world_size / max(time.perf_counter() - t_epoch, 1e-6)
                progress({"epoch": epoch + 1, "epochs": ft.epochs, "step": state["step"],
                          "steps": steps_per_epoch, "loss": round(loss_sum / max(seen, 1), 4),
                          "images_per_s": round(rate, 1),
                          "val_top1": state["history"][-1]["val_top1"]
                          if state["history"] else None})
            n = ft.checkpoint_every_steps
            out_of_time = rank.any((deadline is not None and time.time() > deadline)
                                   or should_stop())
            if state["step"] < steps_per_epoch and (out_of_time or (n and state["step"] % n == 0)):
                state["train_seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                checkpoint()
                if out_of_time:
                    return {"cancelled": True} if should_stop() else {
                        "continue": True, "epoch": state["epoch"], "step": state["step"]}
        epoch_s = time.perf_counter() - t_epoch
        train_loss = rank.mean(loss_sum / max(seen, 1))
        if rank.is_main:  # validation on rank 0, the others wait at the checkpoint
            proba, yv, val_ids, _ = predict_proba(net, source, splits.val, pre, device,
                                                  per_rank)
            state["val_ids"] = val_ids.tolist()
            val_top1 = float((proba.argmax(1) == yv).mean()) if len(yv) else 0.0
            state["history"].append({
                "epoch": epoch + 1, "loss": round(train_loss, 5), "val_top1": round(val_top1, 5),
                "images": seen * rank.world_size,
                "images_per_s": round(seen * rank.world_size / epoch_s, 2) if epoch_s else None,
                "lr": [round(g["lr"], 8) for g in opt.param_groups]})
            if val_top1 > state["best_val"]:
                state["best_val"], state["best_epoch"] = val_top1, epoch + 1
                save_main({"model": net.state_dict(), "meta": json.dumps({
                    "backbone": backbone.name, "weights": backbone.weights,
                    "n_classes": n_classes, "class_names": class_names, "epoch": epoch + 1,
                    "val_top1": val_top1, "preprocessing": pre.to_dict()})}, best_path)
        state["epoch"], state["step"] = epoch + 1, 0
        state["train_seconds"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        checkpoint()
    if splits_file is not None and rank.is_main:  # the samples used: drawn and decoded
        atomic_write_text(splits_file, json.dumps({"train": sorted(state["trained_on"]),
                                                   "val": state["val_ids"]}), fsync=False)
    return {"best": str(best_path), "checkpoint": str(last_path), "device": device,
            "world_size": rank.world_size,
            "best_epoch": state["best_epoch"], "best_val_top1": state["best_val"],
            "epochs": ft.epochs, "steps_per_epoch": steps_per_epoch,
            "global_step": state["global_step"],
            "history": state["history"], "resumes": state["resumes"],
            "seconds": round(state["train_seconds"], 3),
            "train_images": len(train_idx), "val_images": len(splits.val),
            "skipped_train": state["skipped"][:100],
            "params": int(sum(p.numel() for p in net.parameters()))}


def load_network(best: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The fine-tuned network from ``best.pt`` (safe load), in eval mode, and its metadata."""
    import torch

    raw = torch.load(best, map_location="cpu", weights_only=True)
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
