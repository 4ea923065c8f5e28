"""Feature extraction for one shard: decode -> preprocess -> frozen backbone -> HDF5 shard.

Decoding of the next batches runs in a thread pool while the current batch goes through the
network (torch releases the GIL), because prefork Celery children may not start DataLoader
worker processes. Resizing runs in the calling thread, on the device when it is a GPU. The
backbone and the data source are cached per process, so a worker pays for loading them once.
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
# Progress (and the cancel check that comes with it) after the first batch, then at most this
# often, and after the last batch.
PROGRESS_EVERY_S = 0.5


def pick_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu`` (called in the child)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def cached_backbone(name: str, weights: str | None, device: str,
                    use_compile: bool = False) -> backbones.Backbone:
    import torch

    bb = backbones.load_backbone(name, weights, device)
    bb.model = bb.model.to(memory_format=torch.channels_last)
    if use_compile:  # compiled lazily on the first batch, once per worker process
        bb.model = torch.compile(bb.model, dynamic=True)
    return bb


# Largest batch that fit on each device for each model input, per worker process: a batch
# that ran out of memory is halved and retried, and later batches start at the size that fit.
_FITS: dict[tuple[str, str, int], int] = {}


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc)
                                           or "can't allocate memory" in str(exc)))


def forward_halving(fn: Callable[[Any], Any], x: Any, key: tuple[str, str, int]) -> Any:
    """``fn(x)`` in slices no larger than the size known to fit; on out-of-memory halve the
    slice and retry it (down to one image, then the error stands)."""
    import torch

    outs, i, n = [], 0, len(x)
    while i < n:
        size = min(_FITS.get(key, n), n - i)
        try:
            outs.append(fn(x[i: i + size]))
        except Exception as exc:
            if not is_oom(exc) or size == 1:
                raise
            _FITS[key] = size // 2
            log.warning("out of memory at batch %d for %s; retrying at %d", size, key[0],
                        size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += size
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@functools.lru_cache(maxsize=4)
def cached_source(spec: DataSpec) -> data.Source:
    return data.open_source(spec)


def autocast_dtype(device: str, precision: str) -> Any:
    """The autocast dtype for ``precision`` on ``device`` (None: run in fp32)."""
    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def preprocess(images: list[np.ndarray], pre: Preprocessing, device: str,
               out: Any | None = None) -> Any:
    """RGB uint8 images -> normalized float NCHW (channels_last) batch.

    Resize the shorter side to ``pre.resize`` and center-crop ``pre.crop``. Small images are
    upsampled, never zero-padded; downsampling is antialiased. Resizing runs on uint8 in
    channels_last layout (torch's vectorised path, ~2x cheaper than on float), one call per
    batch when the images share a size; conversion to float and normalization are one pass
    that writes into ``out`` (a batch this function returned before for the same device,
    reused so that no batch allocates a fresh 19 MB tensor) when it is given and large enough.
    """
    import torch
    import torch.nn.functional as F

    mode = pre.interpolation if pre.interpolation in ("bilinear", "bicubic") else "bilinear"
    n, crop = len(images), pre.crop
    if out is None or out.shape[0] < n or out.shape[2:] != (crop, crop):
        out = torch.empty((n, 3, crop, crop), dtype=torch.float32, device=device)
        out = out.contiguous(memory_format=torch.channels_last)
    dest = out[:n]  # still channels_last-contiguous

    def resize_crop(nhwc: torch.Tensor) -> torch.Tensor:
        h, w = nhwc.shape[1:3]
        scale = pre.resize / min(h, w)
        nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
        x = nhwc.permute(0, 3, 1, 2)  # a channels_last view, no copy
        y = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False,
                          antialias=scale < 1)
        top, left = (nh - crop) // 2, (nw - crop) // 2
        return y[..., top: top + crop, left: left + crop]

    def upload(array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if device.startswith("cuda"):  # page-locked host memory: an asynchronous copy
            return t.pin_memory().to(device, non_blocking=True)
        return t

    if len({im.shape for im in images}) == 1:
        normalize(resize_crop(upload(np.stack(images))), pre, out=dest)
    else:
        for i, im in enumerate(images):
            normalize(resize_crop(upload(im[None])), pre, out=dest[i: i + 1])
    return dest


def normalize(x: Any, pre: Preprocessing, out: Any | None = None) -> Any:
    """0..255 NCHW (uint8 or float) -> float ``(x / 255 - mean) / std``, computed as
    ``x * scale + bias`` per channel: one pass that converts, normalizes and writes (into
    ``out`` when given), vectorised for channels_last."""
    import torch

    scale, bias = _affine(tuple(pre.mean), tuple(pre.std), str(x.device))
    if out is None:
        return torch.addcmul(bias, x, scale)
    return torch.addcmul(bias, x, scale, out=out)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[Any, Any]:
    """Per-channel (scale, bias) of :func:`normalize`, made once per recipe and device (not a
    host-to-device copy every batch)."""
    import torch

    s = torch.tensor(std, device=device) * 255.0
    return ((1.0 / s).view(1, 3, 1, 1),
            (-torch.tensor(mean, device=device) * 255.0 / s).view(1, 3, 1, 1))


def decode_threads(device: str) -> int:
    """Decode threads ahead of the model: on CPU one keeps up and leaves the cores to the
    forward pass; a GPU worker needs several to keep the device fed."""
    return 1 if device == "cpu" else max(2, min(8, (os.cpu_count() or 2)))


def _decoded(source: data.Source, indices: np.ndarray, batch_size: int,
             threads: int) -> Iterator[data.Loaded]:
    """Yield decoded batches, with up to ``threads`` batches decoded ahead in threads.

    Only decoding runs in the threads: torch ops called from a helper thread start their own
    OpenMP team, which fights the forward pass's team for the cores. Resizing runs in the
    caller's thread (on the device when it is a GPU).
    """
    chunks = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]

    def work(chunk: np.ndarray) -> data.Loaded:
        return source.load([int(i) for i in chunk])

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ff-decode") as pool:
        pending: list[Future[data.Loaded]] = []
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

    t0, started_at = time.perf_counter(), time.time()
    spec = plan.job_spec
    result = {"shard": shard.id, "split": shard.split, "path": shard.path,
              "worker": f"{socket.gethostname()}:{os.getpid()}", "started_at": started_at}
    done = store.cached_summary(shard.path, plan.key, shard.rows)
    # Reuse only a file written after planning (this task delivered twice, or a concurrent job):
    # one that existed then was judged untrusted (checksum mismatch) and is extracted anew.
    if done is not None and store.mtime(shard.path) >= plan.created:
        return {**result, **done, "cached": True, "seconds": 0.0}

    source = cached_source(spec.data)
    if source.fingerprint() != plan.fingerprint:
        cached_source.cache_clear()
        source = cached_source(spec.data)
        if source.fingerprint() != plan.fingerprint:
            raise DataError(f"data at {spec.data.path or spec.data.source!r} changed since the "
                            "job was planned; fix: submit the job again")
    indices = data.split_indices(source, spec.data)[shard.split][shard.start: shard.end]
    device = pick_device(spec.backbone.device)
    bb = cached_backbone(spec.backbone.name, spec.backbone.weights, device,
                         spec.backbone.compile)
    pre = bb.weights.preprocessing.scaled_to(spec.backbone.image_size)
    out_dtype = np.float16 if spec.backbone.feature_dtype == "float16" else np.float32

    feats, kept, skipped = [], [], []
    done = 0
    t_model = 0.0
    amp = autocast_dtype(device, spec.backbone.precision)
    fits_key = (spec.backbone.name, device, pre.crop)

    def run(x: Any) -> Any:
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            return bb.model(x)

    threads = decode_threads(device)
    buffer, reported = None, 0.0
    with torch.inference_mode():
        for loaded in _decoded(source, indices, spec.backbone.batch_for(device), threads):
            skipped.extend((source.sample_id(i), why) for i, why in loaded.failures)
            if loaded.images:
                tm = time.perf_counter()
                batch = buffer = preprocess(loaded.images, pre, device, out=buffer)
                out = forward_halving(run, batch, fits_key)
                feats.append(out.float().cpu().numpy().astype(out_dtype))
                kept.extend(loaded.indices)
                t_model += time.perf_counter() - tm
            done += len(loaded.indices) + len(loaded.failures)
            if progress is not None and (reported == 0 or done == shard.rows
                                         or time.perf_counter() - reported >= PROGRESS_EVERY_S):
                progress(done, shard.rows)  # Redis round trips: not after every batch
                reported = time.perf_counter()
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
            "seconds": round(seconds, 3), "finished_at": started_at + seconds,
            "model_seconds": round(t_model, 3),
            "images_per_s": round(len(kept_arr) / seconds, 2) if seconds else None,
            "device": device, "threads": torch.get_num_threads(),
            "batch": spec.backbone.batch_for(device),
            "forward_batch": _FITS.get(fits_key), "precision": str(amp or "fp32"),
            "compiled": spec.backbone.compile}

