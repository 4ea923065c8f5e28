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
from pipeline.errors import DataError
from pipeline.heads.linear import l2_grid
from pipeline.plan import BackboneInfo, Exclusion, Plan, Shard, Splits
from pipeline.sources import DIGEST_BYTES, Source, digests, open_source
from pipeline.spec import DataSpec, JobSpec
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


def data_fingerprint(source: Source, digest: np.ndarray, mode: str) -> str:
    """What identifies the data: every sample's digest, label and id, and the class names."""
    h = hashlib.sha256(f"{source.kind}\0{mode}\0".encode())
    h.update(np.ascontiguousarray(digest).tobytes())
    h.update(np.asarray(source.labels, np.int64).tobytes())
    h.update(json.dumps([source.class_names,
                         [source.sample_id(i) for i in range(len(source))]]).encode())
    return f"{source.kind}:{mode}:{h.hexdigest()}"


def find_exclusions(source: Source, digest: np.ndarray, data: DataSpec) -> list[Exclusion]:
    """Samples with the same bytes: one copy is kept (the one in the most held-out predefined
    split: test, then val, then train; else the first), the others are excluded; samples with
    the same bytes but different labels are all excluded (``data.conflicts: exclude``).

    Raises:
        DataError: conflicting labels with ``data.conflicts: error``.
    """
    if data.duplicates == "keep" or len(digest) == 0:
        return []
    keys = np.ascontiguousarray(digest).view(f"V{DIGEST_BYTES}").ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    if len(repeated) == 0:
        return []
    rank = np.full(len(source), 3)
    predefined = source.predefined_splits() or {}
    for name, r in (("train", 2), ("val", 1), ("test", 0)):
        if name in predefined:
            rank[predefined[name]] = r
    groups: dict[int, list[int]] = {}
    for i in repeated:
        groups.setdefault(int(inverse[i]), []).append(int(i))
    out: list[Exclusion] = []
    for members in groups.values():
        names = sorted({source.class_names[int(source.labels[m])] for m in members})
        ids = [source.sample_id(m) for m in members]
        if len(names) > 1:
            if data.conflicts == "error":
                raise DataError(f"samples {ids[:4]} have the same content but the labels "
                                f"{names}; fix: correct the labels, or set data.conflicts: "
                                "exclude to leave them out")
            out += [Exclusion(index=m, id=i, kind="conflict",
                              reason=f"same content as {len(members) - 1} other sample(s) "
                                     f"labelled {', '.join(names)}")
                    for m, i in zip(members, ids, strict=True)]
            continue
        keep = min(members, key=lambda m: (int(rank[m]), m))
        out += [Exclusion(index=m, id=source.sample_id(m), kind="duplicate",
                          reason=f"exact duplicate of {source.sample_id(keep)}")
                for m in members if m != keep]
    return sorted(out, key=lambda e: e.index)


def unseen_classes(source: Source, split: dict[str, np.ndarray], data: DataSpec) -> list[str]:
    """Classes of val/test with no training sample: an error, or (allowed) a warning.

    Raises:
        DataError: a val or test class never seen in training.
    """
    seen = set(source.labels[split["train"]].tolist())
    found = []
    for name in ("val", "test"):
        missing = sorted(set(source.labels[split[name]].tolist()) - seen)
        if missing:
            labels = [source.class_names[c] for c in missing]
            found.append(f"{len(missing)} class(es) of the {name} split have no training "
                         f"sample: {labels[:10]} (they can never be predicted right)")
    if found and not data.allow_unseen_test_classes:
        raise DataError(f"{found[0]}; fix: add training samples of those classes, drop them "
                        "from the evaluation data, or set data.allow_unseen_test_classes: true")
    return found


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
    mode = spec.data.fingerprint
    digest = digests(source, range(len(source)), mode)
    excluded = find_exclusions(source, digest, spec.data) if mode == "content" else []
    split = splits.compute_splits(
        source.labels, source.predefined_splits(), seed=spec.data.seed,
        test_fraction=spec.data.test_fraction, val_fraction=spec.probe.val_fraction,
        limit=spec.data.limit, exclude=[e.index for e in excluded])
    warnings = unseen_classes(source, split, spec.data)
    weights = backbones.resolve_weights(spec.backbone.name, spec.backbone.weights)
    pre = weights.preprocessing.scaled_to(spec.backbone.image_size)
    fingerprint = data_fingerprint(source, digest, mode)
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
        strategy_reason=reason, fingerprint=fingerprint, fingerprint_mode=mode,
        class_names=source.class_names, n_samples=len(source), excluded=excluded,
        warnings=warnings,
        splits=Splits(**{k: [int(i) for i in v] for k, v in split.items()}),
        backbone=BackboneInfo(
            name=spec.backbone.name, weights=spec.backbone.weights, weights_id=weights.id,
            weights_sha256=weights.sha256, preprocessing=pre.to_dict(),
            feature_dtype=spec.backbone.feature_dtype, precision=spec.backbone.precision),
        key=key, shard_dir=shard_dir, shards=shards, sweep=sweep_slices(spec),
        l2=spec.probe.l2).with_digests(digest)
