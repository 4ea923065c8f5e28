"""Spec -> plan: which shards a job needs, where they live, and which are already cached.

A plan is small JSON (no indices, no pixels): the worker recomputes a shard's indices from the
data source and the split seed, and checks the data fingerprint matches the one planned.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import backbones, data, store
from pipeline.spec import JobSpec
from pipeline.strategy import choose


@dataclass(frozen=True)
class Shard:
    """One extraction task's worth of one split."""

    split: str
    start: int
    end: int
    path: str
    cached: bool = False

    @property
    def id(self) -> str:
        return f"{self.split}-{self.start}-{self.end}"

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Everything the tasks of one job need to know, as plain data."""

    job_id: str
    spec: dict[str, Any]
    key: str
    shard_dir: str
    fingerprint: str
    weights_id: str
    weights_sha256: str
    preprocessing: dict[str, Any]
    class_names: list[str]
    split_sizes: dict[str, int]
    shards: list[Shard] = field(default_factory=list)
    created: float = 0.0  # when planned: a shard file older than this was not trusted then
    strategy: str = "probe"  # what runs: probe | finetune (``auto`` is decided at planning)
    strategy_reason: str = ""

    @property
    def job_spec(self) -> JobSpec:
        return JobSpec.from_dict(self.spec)

    @property
    def job_dir(self) -> Path:
        return Path(self.spec["output"]) / "jobs" / self.job_id

    def shards_of(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        shards = [Shard(**s) for s in raw["shards"]]
        return cls(**{**raw, "shards": shards})


def content_key(spec: JobSpec, fingerprint: str, weights: backbones.WeightsInfo) -> str:
    """Hash of everything that determines the stored features."""
    pre = weights.preprocessing.scaled_to(spec.backbone.image_size)
    parts = {
        "schema": store.SCHEMA_VERSION,
        "data": fingerprint,
        "split": {"seed": spec.data.seed, "test_fraction": spec.data.test_fraction,
                  "limit": spec.data.limit},
        "shard_size": spec.data.shard_size,
        "backbone": spec.backbone.name,
        "weights_sha256": weights.sha256,
        "preprocessing": pre.to_dict(),
        "layer": "penultimate-pooled",
        "dtype": spec.backbone.feature_dtype,
        "precision": spec.backbone.precision,  # CUDA autocast changes the features
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def make_plan(spec: JobSpec, job_id: str, gpus: int | Callable[[], int] = 0) -> Plan:
    """Resolve a validated spec into a plan (opens the data source and the weights metadata).

    ``gpus``: GPU workers online (or a function that asks the fleet, called only for
    ``strategy: auto``, after the data and backbone checks). A fine-tuning plan has no shards:
    it trains on the images, not on cached features.

    Raises:
        DataError, BackboneError: the data or backbone cannot be used.
    """
    spec = spec.resolved()
    source = data.open_source(spec.data)
    splits = data.split_indices(source, spec.data)
    weights = backbones.resolve_weights(spec.backbone.name, spec.backbone.weights)
    fingerprint = source.fingerprint()
    key = content_key(spec, fingerprint, weights)
    shard_dir = store.join(spec.store_dir, spec.backbone.name, key[:20])
    size = spec.data.shard_size
    shards = []
    manifest = store.read_manifest(shard_dir)
    pre = weights.preprocessing.scaled_to(spec.backbone.image_size)
    n_train = len(splits["train"])
    if "val" not in splits:  # the probe and fine-tuning carve val from train
        n_train = round(n_train * (1 - spec.probe.val_fraction))
    if spec.strategy == "auto" and callable(gpus):
        gpus = gpus()
    strategy, reason = choose(spec, n_train, len(source.class_names), pre.crop,
                              gpus if isinstance(gpus, int) else 0)
    for split in sorted(splits) if strategy == "probe" else []:
        n = len(splits[split])
        for start in range(0, n, size):
            end = min(n, start + size)
            path = store.join(shard_dir, store.shard_name(split, start, end))
            cached = store.trusted_shard(path, key, end - start, manifest)
            shards.append(Shard(split, start, end, str(path), cached))
    return Plan(
        job_id=job_id, spec=spec.to_dict(), key=key, shard_dir=shard_dir,
        fingerprint=fingerprint, weights_id=weights.id, weights_sha256=weights.sha256,
        preprocessing=pre.to_dict(),
        class_names=source.class_names, split_sizes={k: len(v) for k, v in splits.items()},
        shards=shards, created=time.time(), strategy=strategy, strategy_reason=reason)


ALLOWED_ROOTS_ENV = "FEATUREFLEET_ALLOWED_ROOTS"
# Every task carries the plan: keep messages small enough for the broker. Bulk data goes
# through the store, never through Redis.
MAX_PLAN_BYTES = 1 << 20


def check_plan(plan: Plan, message_size: bool = True) -> None:
    """Refuse plans that write outside $FEATUREFLEET_ALLOWED_ROOTS (when set) or (with
    ``message_size``) that would put bulk data on the broker. Called by the client before
    enqueueing and by workers before writing (the size no longer matters there).

    Raises:
        SpecError: a path outside the allowed roots, or a plan too large for a message.
    """
    import os

    from pipeline.errors import SpecError

    raw_roots = [r for r in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    roots = [Path(r).resolve() for r in raw_roots if not store.is_remote(r)]
    if raw_roots:
        spec = plan.spec
        targets = [("output", spec["output"]), ("store", spec["store"])]
        targets += [("store", s.path) for s in plan.shards]
        for name, path in targets:
            if store.is_remote(path):  # a URL must start with an allowed URL prefix
                if not any(str(path).startswith(str(r).rstrip("/") + "/") for r in raw_roots):
                    raise SpecError(name, f"{str(path)!r} is outside the allowed roots "
                                    f"{raw_roots}", f"write under one of them (set by "
                                    f"{ALLOWED_ROOTS_ENV})")
                continue
            p = Path(path).resolve()
            if not any(p == r or p.is_relative_to(r) for r in roots):
                raise SpecError(name, f"{str(path)!r} is outside the allowed roots "
                                f"{[str(r) for r in roots]}", f"write under one of them (set by "
                                f"{ALLOWED_ROOTS_ENV})")
    if not message_size:
        return
    size = len(json.dumps(plan.to_dict()))
    if size > MAX_PLAN_BYTES:
        raise SpecError("data.shard_size", f"the job's plan is {size} bytes for "
                        f"{len(plan.shards)} shards, over the {MAX_PLAN_BYTES}-byte message "
                        "limit", "raise data.shard_size so fewer shards are needed")
