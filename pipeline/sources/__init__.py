"""Data sources: a registry of readers that give labels, sample ids and decoded samples.

Every source answers the same small interface (:class:`Source`): how many samples, their
labels, the class names, a fingerprint of the data (for the cache key), optional predefined
splits, and ``load(indices)`` which decodes those samples (RGB ``uint8`` arrays for images). A
sample that cannot be decoded is returned as a failure (index + reason), never raised: the
shard records it.

One module per source; each registers itself by name with :func:`register`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.spec import DataSpec

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Loaded:
    """Decoded samples for some indices, plus the ones that failed (index, reason)."""

    indices: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # np.ndarray (H, W, 3) uint8 per image
    failures: list[tuple[int, str]] = field(default_factory=list)


class Source:
    """The interface every data source implements."""

    labels: np.ndarray  # int64, one per sample
    class_names: list[str]
    modality: str = "image"

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        """Index arrays per split when the data comes split (e.g. train/ test/ folders)."""
        return None

    def sample_id(self, index: int) -> str:
        return str(index)

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        """Decode the samples at ``indices``; ``min_size``: the smallest side the consumer
        needs (a JPEG may be decoded at a reduced scale, never below it)."""
        raise NotImplementedError


Factory = Callable[[DataSpec], Source]
_SOURCES: dict[str, Factory] = {}
# Modules that register sources when imported (imported on first use, not at import time).
_MODULES = ("arrays", "folder", "manifest", "tv", "webdataset")


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a source factory under ``name`` (the spec's ``data.source``)."""

    def wrap(fn: Factory) -> Factory:
        _SOURCES[name] = fn
        return fn

    return wrap


def registered() -> dict[str, Factory]:
    for mod in _MODULES:
        importlib.import_module(f"pipeline.sources.{mod}")
    return _SOURCES


def open_source(spec: DataSpec) -> Source:
    """Open the data source a spec names.

    Raises:
        DataError: the path is missing, empty, or holds unusable data.
    """
    sources = registered()
    try:
        factory = sources[spec.source]
    except KeyError:
        raise DataError(f"unknown data source {spec.source!r}; fix: use one of "
                        f"{', '.join(sorted(sources))}") from None
    return factory(spec)


@functools.lru_cache(maxsize=4)
def cached_source(spec: DataSpec) -> Source:
    """A source opened once per worker process."""
    return open_source(spec)


def checked_source(spec: DataSpec, fingerprint: str) -> Source:
    """The process's source for ``spec``, reopened once if the data changed since it was
    opened, and refused if it still differs from the planned ``fingerprint``.

    Raises:
        DataError: the data changed since the job was planned.
    """
    source = cached_source(spec)
    if source.fingerprint() != fingerprint:
        cached_source.cache_clear()
        source = cached_source(spec)
        if source.fingerprint() != fingerprint:
            raise DataError(f"data at {spec.path or spec.source!r} changed since the job was "
                            "planned; fix: submit the job again")
    return source


def class_index(raw_labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Class names (numeric labels keep their numeric order) and each sample's class index."""
    names = set(raw_labels)
    numeric = all(c.isdigit() for c in names)
    ordered = sorted(names, key=int) if numeric else sorted(names)
    index = {c: i for i, c in enumerate(ordered)}
    return ordered, np.asarray([index[c] for c in raw_labels], dtype=np.int64)


def failure(index: int, exc: BaseException) -> tuple[int, str]:
    """A recorded skip: the sample's index and a short, readable reason."""
    from pipeline.sources.decode import reason

    return int(index), reason(exc)
