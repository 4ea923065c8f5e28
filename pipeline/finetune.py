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
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import backbones, data, evaluate
from pipeline.extract import (
    _decoded,
    cached_source,
    decode_threads,
    normalize,
    pick_device,
    preprocess,
)
from pipeline.plan import Plan
from pipeline.train import carve_val

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
CHECKPOINT_SCHEMA = 1


def split_indices(plan: Plan, source: data.Source) -> dict[str, np.ndarray]:
    """train / val / test data indices: the probe's splits (val carved from train, seeded)."""
    spec = plan.job_spec
    splits = data.split_indices(source, spec.data)
    if "val" not in splits:
        keep, val_rows = carve_val(source.labels[splits["train"]], spec.probe.val_fraction,
                                   spec.data.seed)
        splits = {**splits, "val": splits["train"][val_rows], "train": splits["train"][keep]}
    return splits


def build_network(name: str, weights: str | None, n_classes: int, device: str) -> Any:
    """Backbone + a new linear head as one trainable ``torch.nn.Module`` (and the backbone)."""
    import torch

    bb = backbones.load_backbone(name, weights, "cpu")

    class FinetuneNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = bb.model
            self.head = torch.nn.Linear(bb.feature_dim, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    net = FinetuneNet().requires_grad_(True)
    for m in net.modules():
        # Some ports keep TF's BN momentum (0.01): running statistics would then still be
        # ImageNet's after a short fine-tune, and eval mode would see the wrong ones.
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            m.momentum = max(m.momentum, 0.1)
    return net.to(device).to(memory_format=torch.channels_last), bb


def augment(images: list[np.ndarray], pre: backbones.Preprocessing, device: str,
            gen: Any, scale_min: float, hflip: bool) -> Any:
    """Random resized crop (+ flip) of uint8 HWC images -> normalized NCHW float batch."""
    import torch
    from torchvision.ops import roi_align

    boxes = []
    for im in images:
        h, w = im.shape[:2]
        area = h * w
        for _ in range(10):  # torchvision's RandomResizedCrop recipe, ratio 3/4..4/3
            target = area * float(torch.empty(1).uniform_(scale_min, 1.0, generator=gen))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3),
                                                           generator=gen)))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if cw <= w and ch <= h:
                x0 = float(torch.rand(1, generator=gen)) * (w - cw)
                y0 = float(torch.rand(1, generator=gen)) * (h - ch)
                break
        else:
            side = min(h, w)
            cw = ch = side
            x0, y0 = (w - side) / 2, (h - side) / 2
        boxes.append((x0, y0, x0 + cw, y0 + ch))
    crop = pre.crop
    out = torch.empty((len(images), 3, crop, crop), device=device)
    same = len({im.shape for im in images}) == 1
    groups = [list(range(len(images)))] if same else [[i] for i in range(len(images))]
    for rows in groups:
        x = torch.from_numpy(np.stack([images[i] for i in rows])).to(device)
        x = x.permute(0, 3, 1, 2).float()
        b = torch.tensor([[j, *boxes[i]] for j, i in enumerate(rows)], dtype=torch.float32,
                         device=device)
        out[rows] = roi_align(x, b, output_size=crop, spatial_scale=1.0, sampling_ratio=-1,
                              aligned=True)
    if hflip:
        flip = torch.rand(len(images), generator=gen) < 0.5
        out[flip.to(device)] = out[flip.to(device)].flip(-1)
    return normalize(out.contiguous(memory_format=torch.channels_last), pre)


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _save_atomic(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def predict_proba(net: Any, source: data.Source, indices: np.ndarray, pre: Any, device: str,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Class probabilities for ``indices`` (center crop, eval mode); labels; skipped samples."""
    import torch

    probs, labels, skipped = [], [], []
    net.eval()
    use_amp = device.startswith("cuda")
    threads = decode_threads(device)
    with torch.inference_mode():
        for loaded in _decoded(source, indices, batch_size, threads):
            skipped.extend((source.sample_id(i), why) for i, why in loaded.failures)
            if not loaded.images:
                continue
            batch = preprocess(loaded.images, pre, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = net(batch)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(source.labels[np.asarray(loaded.indices)])
    n_classes = len(source.class_names)
    return (np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64), skipped)


def run(plan: Plan, attempt: int, progress: Progress | None = None,
        after_checkpoint: Callable[[], None] | None = None, deadline: float | None = None,
        resume_reason: str = "") -> dict[str, Any]:
    """Fine-tune (resuming from ``last.pt`` when present); return small JSON with the best
    checkpoint, the per-epoch history and the resumes.

    ``deadline`` (``time.monotonic()`` seconds): past it, checkpoint at the next step and
    return ``{"continue": True}`` so a fresh task carries on.
    """
    import torch

    spec = plan.job_spec
    ft = spec.finetune
    out = plan.job_dir / "finetune"
    last_path, best_path = out / "last.pt", out / "best.pt"
    device = pick_device(ft.device)
    source = cached_source(spec.data)
    splits = split_indices(plan, source)
    n_classes = len(plan.class_names)
    torch.manual_seed(spec.data.seed)
    net, bb = build_network(spec.backbone.name, spec.backbone.weights, n_classes, device)
    pre = bb.weights.preprocessing.scaled_to(spec.backbone.image_size)
    head_params = list(net.head.parameters())
    body_params = list(net.backbone.parameters())
    groups = [{"params": body_params, "lr": ft.lr * ft.backbone_lr_mult},
              {"params": head_params, "lr": ft.lr}]
    if ft.optimizer == "sgd":
        opt: Any = torch.optim.SGD(groups, lr=ft.lr, momentum=0.9, nesterov=True,
                                   weight_decay=ft.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=ft.lr, weight_decay=ft.weight_decay)
    train_idx = splits["train"]
    steps_per_epoch = len(train_idx) // ft.batch_size
    if steps_per_epoch == 0:
        from pipeline.errors import JobError

        raise JobError(f"job {plan.job_id}: {len(train_idx)} training images are fewer than "
                       f"finetune.batch_size {ft.batch_size}; fix: lower finetune.batch_size")
    total = steps_per_epoch * ft.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(total, max(1, round(ft.warmup_fraction * total))))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)
    gen = torch.Generator().manual_seed(spec.data.seed + 1)

    state: dict[str, Any] = {"epoch": 0, "step": 0, "global_step": 0, "best_val": -1.0,
                             "best_epoch": None, "history": [], "resumes": [],
                             "train_seconds": 0.0, "skipped": []}
    if last_path.is_file():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["rng"]["augment"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(_as_random_state(ckpt["rng"]["python"]))
        state = json.loads(ckpt["state"])
        state["resumes"].append({"reason": resume_reason or "restarted", "attempt": attempt,
                                 "epoch": state["epoch"],
                                 "step": state["step"], "global_step": state["global_step"],
                                 "at": time.time()})
        log.warning("job %s: fine-tuning resumes at epoch %d step %d (attempt %d)",
                    plan.job_id, state["epoch"], state["step"], attempt)

    def checkpoint() -> None:
        _save_atomic({"schema": CHECKPOINT_SCHEMA, "model": net.state_dict(),
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "rng": {"augment": gen.get_state(), "torch": torch.get_rng_state(),
                              "python": list(_flatten_random_state(random.getstate()))},
                      "state": json.dumps(state)}, last_path)
        if after_checkpoint is not None:
            after_checkpoint()

    # bf16 autocast on CUDA (fp16 would need loss scaling: it trains in fp32 instead)
    use_amp = device.startswith("cuda") and spec.backbone.precision == "bf16"
    threads = decode_threads(device)
    t_start = time.perf_counter()
    while state["epoch"] < ft.epochs:
        epoch = state["epoch"]
        order = np.random.default_rng([spec.data.seed, epoch]).permutation(train_idx)
        order = order[: steps_per_epoch * ft.batch_size]  # drop the last partial batch
        net.train()
        seen, loss_sum, t_epoch = 0, 0.0, time.perf_counter()
        todo = order[state["step"] * ft.batch_size:]
        for loaded in _decoded(source, todo, ft.batch_size, threads):
            state["skipped"].extend(source.sample_id(i) for i, _ in loaded.failures)
            if len(loaded.images) >= 2:
                x = augment(loaded.images, pre, device, gen, ft.crop_scale_min,
                            ft.hflip) if ft.augment else \
                    preprocess(loaded.images, pre, device)
                y = torch.as_tensor(source.labels[np.asarray(loaded.indices)], device=device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    loss = loss_fn(net(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
            sched.step()
            state["step"] += 1
            state["global_step"] += 1
            if progress is not None:
                rate = seen / max(time.perf_counter() - t_epoch, 1e-6)
                progress({"epoch": epoch + 1, "epochs": ft.epochs, "step": state["step"],
                          "steps": steps_per_epoch, "loss": round(loss_sum / max(seen, 1), 4),
                          "images_per_s": round(rate, 1),
                          "val_top1": state["history"][-1]["val_top1"]
                          if state["history"] else None})
            n = ft.checkpoint_every_steps
            out_of_time = deadline is not None and time.monotonic() > deadline
            if state["step"] < steps_per_epoch and (out_of_time or (n and state["step"] % n == 0)):
                state["train_seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                checkpoint()
                if out_of_time:
                    return {"continue": True, "epoch": state["epoch"], "step": state["step"]}
        epoch_s = time.perf_counter() - t_epoch
        proba, yv, _ = predict_proba(net, source, splits["val"], pre, device, ft.batch_size)
        val_top1 = float((proba.argmax(1) == yv).mean()) if len(yv) else 0.0
        state["history"].append({"epoch": epoch + 1, "loss": round(loss_sum / max(seen, 1), 5),
                                 "val_top1": round(val_top1, 5), "images": seen,
                                 "images_per_s": round(seen / epoch_s, 2) if epoch_s else None,
                                 "lr": [round(g["lr"], 8) for g in opt.param_groups]})
        if val_top1 > state["best_val"]:
            state["best_val"], state["best_epoch"] = val_top1, epoch + 1
            _save_atomic({"model": net.state_dict(), "meta": json.dumps({
                "backbone": spec.backbone.name, "weights": spec.backbone.weights,
                "n_classes": n_classes, "class_names": plan.class_names, "epoch": epoch + 1,
                "val_top1": val_top1, "preprocessing": pre.to_dict()})}, best_path)
        state["epoch"], state["step"] = epoch + 1, 0
        state["train_seconds"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        checkpoint()
        if progress is not None:
            progress({"epoch": epoch + 1, "epochs": ft.epochs, "step": steps_per_epoch,
                      "steps": steps_per_epoch, "loss": state["history"][-1]["loss"],
                      "images_per_s": state["history"][-1]["images_per_s"],
                      "val_top1": round(val_top1, 4)})
    return {"best": str(best_path), "checkpoint": str(last_path), "device": device,
            "best_epoch": state["best_epoch"], "best_val_top1": state["best_val"],
            "epochs": ft.epochs, "steps_per_epoch": steps_per_epoch,
            "global_step": state["global_step"],
            "history": state["history"], "resumes": state["resumes"],
            "seconds": round(state["train_seconds"], 3),
            "train_images": len(train_idx), "val_images": len(splits["val"]),
            "skipped_train": state["skipped"][:100],
            "params": int(sum(p.numel() for p in net.parameters()))}


def load_network(best: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The fine-tuned network from ``best.pt`` (safe load), in eval mode, and its metadata."""
    import torch

    raw = torch.load(best, map_location="cpu", weights_only=True)
    meta = json.loads(raw["meta"])
    net, _ = build_network(meta["backbone"], backbones.RANDOM, meta["n_classes"], device)
    net.load_state_dict(raw["model"])
    return net.eval(), meta


def evaluate_test(plan: Plan, trained: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of the best epoch's network (the test split is used only here)."""
    spec = plan.job_spec
    device = pick_device(spec.finetune.device)
    source = cached_source(spec.data)
    net, meta = load_network(trained["best"], device)
    pre = backbones.Preprocessing.from_dict(meta["preprocessing"])
    proba, y, skipped = predict_proba(net, source, split_indices(plan, source)["test"], pre,
                                      device, spec.finetune.batch_size)
    metrics = evaluate.classification_metrics(y, proba, plan.class_names)
    return {**metrics, "skipped_test": [{"id": i, "reason": r} for i, r in skipped]}


def _flatten_random_state(st: tuple[Any, ...]) -> tuple[Any, ...]:
    # random.getstate() = (version, tuple of 625 ints, gauss_next); stored as plain lists
    return (st[0], list(st[1]), st[2])


def _as_random_state(raw: Any) -> tuple[Any, ...]:
    return (raw[0], tuple(raw[1]), raw[2])
