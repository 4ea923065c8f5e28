"""Feature extraction for one shard: decode -> preprocess -> frozen backbone -> HDF5 shard.

:func:`extract_shard` takes narrow, typed arguments (the source, the sample indices, the
resolved backbone, how to run it, and where the shard goes), so it runs and is tested without
Celery, Redis or a plan.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.backbones import (
    AnyPreprocessing,
    Preprocessing,
    preprocessing_from_dict,
    use_preprocessing,
)
from pipeline.devices import (
    CoreSplit,
    autocast_dtype,
    cached_backbone,
    decode_threads,
    decoded,
    decoded_on,
    fitted_batch,
    forward_halving,
    pick_device,
)
from pipeline.errors import BackboneError
from pipeline.plan import BackboneInfo
from pipeline.preprocess import SIGNATURE_SIDE, details, preprocess, signatures
from pipeline.sources import Source
from pipeline.spec import BackboneSpec
from pipeline.store import shards

Progress = Callable[[int, int], None]  # (samples done in this shard, shard size)
# Progress (and the cancel check that comes with it) after the first batch, then at most this
# often, and after the last batch.
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class Target:
    """Where a shard goes: its path, the content key, extra attributes for the file, and the
    planning time (a valid shard written after it by another task is adopted, not replaced)."""

    path: str
    key: str
    not_before: float
    attrs: dict[str, Any] = field(default_factory=dict)


FP16_TINY = 6.1e-5  # below float16's smallest normal number: values lose their digits


def refuse_underflow(f32: np.ndarray, indices: list[int], source: Any) -> None:
    """Refuse features that float16 shards cannot hold: a row whose largest value is below
    float16's normal range would be stored as (nearly) zeros and every head would see noise.

    Raises:
        BackboneError: with the sample, the magnitude and the fix (float32 shards).
    """
    top = np.abs(f32).max(axis=1) if f32.size else np.zeros(0)
    bad = np.flatnonzero((top > 0) & (top < FP16_TINY))
    if len(bad):
        i = int(bad[0])
        raise BackboneError(f"the features of {source.sample_id(indices[i])!r} are at most "
                            f"{top[i]:.1e} in magnitude: float16 shards would store them as "
                            "zeros (an untrained network's activations can vanish like this); "
                            "fix: backbone.feature_dtype: float32")

def decode_min_side(pre: AnyPreprocessing, mode: str) -> int | None:
    """The smallest image side decoding must keep (``decode: scaled``, and ``auto`` on the
    CPU): the resize's shorter
    side, so the network's input is never upsampled from a reduced decode; None: full (and
    for texts)."""
    return pre.resize if mode in ("scaled", "auto") and isinstance(pre, Preprocessing) else None


def extract_shard(source: Source, indices: Sequence[int], backbone: BackboneInfo,
                  run: BackboneSpec, target: Target,
                  progress: Progress | None = None) -> shards.ShardResult:
    """Run the frozen backbone over ``indices`` of ``source`` and write the shard.

    Returns:
        small JSON: path, rows, sha256 (computed by this writer), skipped samples, seconds,
        images/s, worker, device, batch sizes.

    Raises:
        BackboneError: the worker's weights are not the ones the job was planned with.
        StoreError: the shard cannot be written.
    """
    import torch

    t0, started_at = time.perf_counter(), time.time()
    device = pick_device(run.device)
    bb = cached_backbone(backbone.name, backbone.weights, device, run.compile)
    if bb.weights.sha256 != backbone.weights_sha256:
        raise BackboneError(f"this worker's {backbone.name} weights ({bb.weights.sha256[:12]}) "
                            f"differ from the planned ones ({backbone.weights_sha256[:12]}); "
                            "fix: install the same weights on every worker")
    pre = preprocessing_from_dict(backbone.preprocessing)
    use_preprocessing(bb.model, pre)
    text = pre.modality == "text"
    if text:  # batches of similar length: less padding (rows keep their sample indices)
        indices = sorted(indices, key=source.text_length)
    out_dtype = np.float16 if backbone.feature_dtype == "float16" else np.float32
    amp = autocast_dtype(device, backbone.precision)
    fits_key = (backbone.name, device, pre.input_size)
    batch_size = run.batch_for(device)

    def forward(x: Any) -> Any:
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            return bb.model(x)

    feats: list[np.ndarray] = []
    sigs: list[np.ndarray] = []
    pics: list[np.ndarray] = []  # images: their 64 x 64 pictures (quality.detail)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    done, t_model, reported, truncated = 0, 0.0, 0.0, 0
    buffer = None
    total = len(indices)
    on_device = run.decode == "auto" and device.startswith("cuda") and pre.modality == "image"
    min_size = decode_min_side(pre, run.decode)
    decoder = pre.modality if pre.modality != "image" else "nvjpeg" if on_device else (
        f"cpu-{'scaled' if min_size else 'full'}")
    split = CoreSplit(device, (backbone.name, pre.input_size, source.kind, decoder))
    try:
        with torch.inference_mode():
            for loaded in decoded(source, indices, batch_size, decode_threads(device),
                                  min_size=min_size, encoded=on_device):
                if on_device and loaded.images:  # one batched nvJPEG call, resized on the GPU
                    loaded = decoded_on(device, loaded, min_size)
                skipped.extend((source.sample_id(i), why) for i, why in loaded.failures)
                if loaded.images:
                    tm = time.perf_counter()
                    batch = buffer = preprocess(loaded.images, pre, device, out=buffer)
                    if text:
                        truncated += getattr(bb.model, "truncated")(batch)  # noqa: B009 (mypy)
                    out = forward_halving(forward, batch, fits_key)
                    f32 = out.float().cpu().numpy()
                    if out_dtype is np.float16:
                        refuse_underflow(f32, loaded.indices, source)
                    feats.append(f32.astype(out_dtype))
                    sigs.append(signatures(batch))
                    if pre.modality == "image":
                        pics.append(details(batch))
                    kept.extend(loaded.indices)
                    t_model += time.perf_counter() - tm
                done += len(loaded.indices) + len(loaded.failures)
                if progress is not None and (reported == 0 or done == total
                                             or time.perf_counter() - reported >= PROGRESS_EVERY_S):
                    progress(done, total)  # Redis round trips: not after every batch
                    reported = time.perf_counter()
                split.step(len(loaded.indices), loaded.cpu_seconds)
    finally:
        forward_threads = split.threads
        split.restore()
    features = np.concatenate(feats) if feats else np.zeros((0, bb.feature_dim), out_dtype)
    kept_arr = np.asarray(kept, dtype=np.int64)
    order = np.argsort(kept_arr, kind="stable")  # rows in sample order, however batched
    features, kept_arr = features[order], kept_arr[order]
    sigs = [np.concatenate(sigs)[order]] if sigs else sigs
    pics = [np.concatenate(pics)[order]] if pics else pics
    attrs = {"key": target.key, "backbone": backbone.name, "weights_id": backbone.weights_id,
             "weights_sha256": backbone.weights_sha256, "preprocessing": pre.to_dict(),
             "layer": "penultimate-pooled", "feature_dtype": backbone.feature_dtype,
             "feature_dim": bb.feature_dim, "parameters": bb.parameters, "modality": pre.modality,
             "truncated": truncated, **target.attrs}
    written = shards.write_shard(target.path, shards.ShardData(
        features=features, labels=source.labels[kept_arr] if len(kept_arr) else kept_arr,
        indices=kept_arr, sample_ids=[source.sample_id(int(i)) for i in kept_arr],
        skipped=skipped, attrs=attrs,
        signatures=np.concatenate(sigs) if sigs else np.zeros((0, SIGNATURE_SIDE ** 2),
                                                              np.float16),
        details=pics[0] if pics else None),
        not_before=target.not_before)
    seconds = time.perf_counter() - t0
    return shards.ShardResult(
        path=str(target.path), rows=len(kept_arr), sha256=written.sha256,
        adopted=written.adopted, cached=False,
        skipped=[{"id": sid, "reason": why} for sid, why in skipped],
        worker=f"{socket.gethostname()}:{os.getpid()}", started_at=started_at,
        seconds=round(seconds, 3), finished_at=started_at + seconds,
        model_seconds=round(t_model, 3),
        images_per_s=round(len(kept_arr) / seconds, 2) if seconds else None,
        device=device, threads=forward_threads, batch=batch_size, decode=run.decode,
        decoder=decoder, modality=pre.modality, truncated=truncated,
        forward_batch=fitted_batch(fits_key), precision=str(amp or "fp32"),
        compiled=run.compile, feature_dim=bb.feature_dim, parameters=bb.parameters)
