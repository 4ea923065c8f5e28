"""Feature extraction for one shard: decode -> preprocess -> frozen backbone -> HDF5 shard.

Decoding and preprocessing of the next batches run in a thread pool while the current batch
goes through the network (torch releases the GIL), because prefork Celery children may not
start DataLoader worker processes. The backbone and the data source are cached per process, so
a worker pays for loading them once.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline import backbones, data, store
from pipeline.backbones import Preprocessing
from pipeline.errors import DataError
from pipeline.plan import Plan, Shard
from pipeline.spec import DataSpec

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (images done in this shard, shard size)


def pick_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu`` (called in the child)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def cached_backbone(name: str, weights: str | None, device: str) -> backbones.Backbone:
    import torch

    bb = backbones.load_backbone(name, weights, device)
    bb.model = bb.model.to(memory_format=torch.channels_last)
    return bb


@functools.lru_cache(maxsize=4)
def cached_source(spec: DataSpec) -> data.Source:
    return data.open_source(spec)


def preprocess(images: list[np.ndarray], pre: Preprocessing, device: str) -> Any:
    """RGB uint8 images -> normalized float NCHW batch: resize shorter side, center crop.

    Small images are upsampled (bilinear), never zero-padded; downsampling uses antialiasing.
    Same-sized images are resized as one batch tensor.
    """
    import torch
    import torch.nn.functional as F

    def resize_crop(batch: torch.Tensor) -> torch.Tensor:
        h, w = batch.shape[-2:]
        scale = pre.resize / min(h, w)
        nh, nw = max(pre.crop, round(h * scale)), max(pre.crop, round(w * scale))
        out = F.interpolate(batch, size=(nh, nw), mode=pre.interpolation
                            if pre.interpolation in ("bilinear", "bicubic") else "bilinear",
                            align_corners=False, antialias=scale < 1)
        top, left = (nh - pre.crop) // 2, (nw - pre.crop) // 2
        return out[..., top: top + pre.crop, left: left + pre.crop]

    if len({im.shape for im in images}) == 1:
        arr = torch.from_numpy(np.stack(images)).to(device)
        batch = resize_crop(arr.permute(0, 3, 1, 2).float())
    else:
        batch = torch.cat([resize_crop(torch.from_numpy(im).to(device).permute(2, 0, 1)
                                       .float()[None]) for im in images])
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255.0
    batch = ((batch - mean) / std).clamp_(-1e4, 1e4)
    return batch.contiguous(memory_format=torch.channels_last)


def _batches(source: data.Source, indices: np.ndarray, batch_size: int, pre: Preprocessing,
             threads: int) -> Iterator[tuple[data.Loaded, Any]]:
    """Yield (decoded, preprocessed batch) with up to ``threads`` batches decoded ahead."""
    chunks = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]

    def work(chunk: np.ndarray) -> tuple[data.Loaded, Any]:
        loaded = source.load([int(i) for i in chunk])
        return loaded, (preprocess(loaded.images, pre, "cpu") if loaded.images else None)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ff-decode") as pool:
        pending: list[Future[tuple[data.Loaded, Any]]] = []
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            if len(pending) > threads:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def extract_shard(plan: Plan, shard: Shard, progress: Progress | None = None) -> dict[str, Any]:
    """Extract one shard's features into its HDF5 file, unless a valid copy already exists.

    Returns:
        small JSON: shard id, path, rows, sha256, skipped samples, seconds, images/s, worker.

    Raises:
        DataError: the data changed since the job was planned.
    """
    import torch

    t0 = time.perf_counter()
    spec = plan.job_spec
    result = {"shard": shard.id, "split": shard.split, "path": shard.path,
              "worker": f"{socket.gethostname()}:{os.getpid()}"}
    if store.valid_shard(shard.path, plan.key, shard.rows):
        return {**result, **store.shard_summary(shard.path), "cached": True, "seconds": 0.0}

    source = cached_source(spec.data)
    if source.fingerprint() != plan.fingerprint:
        cached_source.cache_clear()
        source = cached_source(spec.data)
        if source.fingerprint() != plan.fingerprint:
            raise DataError(f"data at {spec.data.path or spec.data.source!r} changed since the "
                            "job was planned; fix: submit the job again")
    indices = data.split_indices(source, spec.data)[shard.split][shard.start: shard.end]
    device = pick_device(spec.backbone.device)
    bb = cached_backbone(spec.backbone.name, spec.backbone.weights, device)
    pre = bb.weights.preprocessing.scaled_to(spec.backbone.image_size)
    out_dtype = np.float16 if spec.backbone.feature_dtype == "float16" else np.float32

    feats, kept, skipped = [], [], []
    done = 0
    t_model = 0.0
    use_amp = device.startswith("cuda")
    threads = max(2, min(8, (os.cpu_count() or 2)))
    with torch.inference_mode():
        for loaded, batch in _batches(source, indices, spec.backbone.batch_size, pre, threads):
            skipped.extend((source.sample_id(i), why) for i, why in loaded.failures)
            if batch is not None:
                tm = time.perf_counter()
                batch = batch.to(device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    out = bb.model(batch)
                feats.append(out.float().cpu().numpy().astype(out_dtype))
                kept.extend(loaded.indices)
                t_model += time.perf_counter() - tm
            done += len(loaded.indices) + len(loaded.failures)
            if progress is not None:
                progress(done, shard.rows)
    features = np.concatenate(feats) if feats else np.zeros((0, bb.feature_dim), out_dtype)
    kept_arr = np.asarray(kept, dtype=np.int64)
    attrs = {"key": plan.key, "backbone": spec.backbone.name, "weights_id": bb.weights.id,
             "weights_sha256": bb.weights.sha256, "preprocessing": pre.to_dict(),
             "dataset_fingerprint": plan.fingerprint, "split": shard.split,
             "shard_start": shard.start, "shard_end": shard.end, "layer": "penultimate-pooled",
             "feature_dtype": spec.backbone.feature_dtype}
    sha = store.write_shard(shard.path, store.ShardData(
        features=features, labels=source.labels[kept_arr] if len(kept_arr) else kept_arr,
        indices=kept_arr, sample_ids=[source.sample_id(int(i)) for i in kept_arr],
        skipped=skipped, attrs=attrs))
    seconds = time.perf_counter() - t0
    return {**result, "rows": len(kept_arr), "sha256": sha, "cached": False,
            "skipped": [{"id": sid, "reason": why} for sid, why in skipped],
            "seconds": round(seconds, 3), "model_seconds": round(t_model, 3),
            "images_per_s": round(len(kept_arr) / seconds, 2) if seconds else None,
            "device": device}

