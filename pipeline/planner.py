"""Spec -> plan: open the data, resolve the backbone, split once, decide everything else.

:func:`make_plan` runs in the client at submission, so a bad spec, unreadable data or an
unknown backbone fails before anything is enqueued.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import numpy as np

from pipeline import backbones, splits
from pipeline.heads.linear import l2_grid
from pipeline.plan import BackboneInfo, Exclusion, Plan, Shard, Splits
from pipeline.sources import Source, open_source
from pipeline.spec import JobSpec
from pipeline.store import files, manifest
from pipeline.store.shards import SCHEMA_VERSION, shard_name
from pipeline.strategy import choose


def content_key(spec: JobSpec, fingerprint: str, weights: backbones.WeightsInfo,
                pre: backbones.Preprocessing, extract_ids: list[int]) -> str:
    """Hash of everything that determines the stored features (not the split: the same
    features serve any split of the same samples)."""
    parts = {
        "schema": SCHEMA_VERSION,
        "data": fingerprint,
        "samples": hashlib.sha256(np.asarray(extract_ids, np.int64).tobytes()).hexdigest(),
        "shard_size": spec.data.shard_size,
        "backbone": spec.backbone.name,
        "weights_sha256": weights.sha256,
        "preprocessing": pre.to_dict(),
        "layer": "penultimate-pooled",
        "dtype": spec.backbone.feature_dtype,
        "precision": spec.backbone.precision,  # CUDA autocast changes the features
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def sweep_slices(spec: JobSpec) -> list[list[float]] | None:
    """The λ grid (strongest first) cut into one contiguous slice per sweep task, or None when
    ``probe.l2`` is fixed."""
    p = spec.probe
    if p.l2 is not None:
        return None
    grid = l2_grid(p.grid_points, p.grid_low, p.grid_high)
    n = min(p.sweep_tasks, len(grid))
    return [[float(v) for v in chunk] for chunk in np.array_split(np.asarray(grid), n)
            if len(chunk)]


def make_plan(spec: JobSpec, job_id: str, gpus: int | Callable[[], int] = 0,
              source: Source | None = None) -> Plan:
    """Resolve a validated spec into a plan (opens the data source and the weights metadata).

    ``gpus``: GPU workers online (or a function that asks the fleet, called only for
    ``strategy: auto``, after the data and backbone checks). A fine-tuning plan has no shards:
    it trains on the samples, not on cached features.

    Raises:
        DataError, BackboneError, StoreError: the data, backbone or store cannot be used.
    """
    spec = spec.resolved()
    source = source or open_source(spec.data)
    excluded: list[Exclusion] = []
    split = splits.compute_splits(
        source.labels, source.predefined_splits(), seed=spec.data.seed,
        test_fraction=spec.data.test_fraction, val_fraction=spec.probe.val_fraction,
        limit=spec.data.limit, exclude=[e.index for e in excluded])
    weights = backbones.resolve_weights(spec.backbone.name, spec.backbone.weights)
    pre = weights.preprocessing.scaled_to(spec.backbone.image_size)
    fingerprint = source.fingerprint()
    if spec.strategy == "auto" and callable(gpus):
        gpus = gpus()
    strategy, reason = choose(spec, len(split["train"]), len(source.class_names), pre.crop,
                              gpus if isinstance(gpus, int) else 0)
    extract_ids = sorted({int(i) for v in split.values() for i in v})
    key = content_key(spec, fingerprint, weights, pre, extract_ids)
    shard_dir = files.join(spec.store_dir, spec.backbone.name, key[:20])
    shards: list[Shard] = []
    if strategy == "probe":
        known = manifest.read_manifest(shard_dir)
        size = spec.data.shard_size
        for start in range(0, len(extract_ids), size):
            end = min(len(extract_ids), start + size)
            path = files.join(shard_dir, shard_name(start, end))
            cached = manifest.trusted(path, key, end - start, known)
            shards.append(Shard(start=start, end=end, path=path, cached=cached))
    return Plan(
        job_id=job_id, created=time.time(), spec=spec, strategy=strategy,
        strategy_reason=reason, fingerprint=fingerprint, class_names=source.class_names,
        n_samples=len(source), excluded=excluded,
        splits=Splits(**{k: [int(i) for i in v] for k, v in split.items()}),
        backbone=BackboneInfo(
            name=spec.backbone.name, weights=spec.backbone.weights, weights_id=weights.id,
            weights_sha256=weights.sha256, preprocessing=pre.to_dict(),
            feature_dtype=spec.backbone.feature_dtype, precision=spec.backbone.precision),
        key=key, shard_dir=shard_dir, shards=shards, sweep=sweep_slices(spec),
        l2=spec.probe.l2)
