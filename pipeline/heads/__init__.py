"""Classifier heads on cached features, behind one small interface and a registry by name.

``linear`` (the probe: L2 logistic regression, :mod:`pipeline.heads.linear`), ``mlp`` (one
hidden layer, dropout, AdamW, early stopping on validation) and ``knn`` (cosine k-nearest
neighbours, k chosen on validation). Every head has ``predict_proba(features)`` and
``save(path)``; :func:`load_head` reads any of them back: torch state dicts with JSON metadata,
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.fsio import atomic_path


class Head(Protocol):
    meta: dict[str, Any]

    def predict_proba(self, features: np.ndarray) -> np.ndarray: ...

    def save(self, path: str | Path) -> None: ...


Loader = Callable[[dict[str, np.ndarray], dict[str, Any]], Head]
_LOADERS: dict[str, Loader] = {}
_MODULES = ("linear", "mlp", "knn")


def register(kind: str) -> Callable[[Loader], Loader]:
    """Register how a saved head of ``kind`` is rebuilt from its arrays and metadata."""

    def wrap(fn: Loader) -> Loader:
        _LOADERS[kind] = fn
        return fn

    return wrap


def kinds() -> list[str]:
    for mod in _MODULES:
        importlib.import_module(f"pipeline.heads.{mod}")
    return sorted(_LOADERS)


def save_head(path: str | Path, kind: str, arrays: dict[str, np.ndarray],
              meta: dict[str, Any]) -> None:
    """Arrays as tensors in a torch state dict (``weights_only``-loadable) + JSON metadata,
    written atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save({**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                    "kind": kind, "meta": json.dumps(meta)}, tmp)


def load_head(path: str | Path) -> Any:
    """Read any saved head (safe: ``weights_only=True``).

    Raises:
        ValueError: an unknown head kind.
    """
    import torch

    kinds()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    kind = raw.get("kind", "linear")
    meta = json.loads(raw["meta"])
    arrays = {k: v.numpy() for k, v in raw.items() if k not in ("kind", "meta")}
    if kind not in _LOADERS:
        raise ValueError(f"unknown head kind {kind!r} in {path}")
    return _LOADERS[kind](arrays, meta)


CHUNK_ROWS = 2048  # rows standardized at a time: no temporary as large as the data


def standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of ``x`` (any float dtype; accumulated in float64, in row
    chunks); constant features get scale 1, since they carry nothing and must not be divided
    by zero."""
    n = max(1, len(x))
    total = np.zeros(x.shape[1], np.float64)
    for s in range(0, len(x), CHUNK_ROWS):
        total += x[s:s + CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mean = total / n
    sq = np.zeros(x.shape[1], np.float64)
    for s in range(0, len(x), CHUNK_ROWS):
        d = x[s:s + CHUNK_ROWS].astype(np.float64) - mean
        sq += (d * d).sum(axis=0)
    scale = np.sqrt(sq / n)
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def standardized(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - mean) / scale`` as a new float32 array, written in row chunks (``x`` may be
    float16: only the result is full-size float32)."""
    out = np.empty(x.shape, np.float32)
    for s in range(0, len(x), CHUNK_ROWS):
        np.subtract(x[s:s + CHUNK_ROWS], mean, out=out[s:s + CHUNK_ROWS], dtype=np.float32)
        out[s:s + CHUNK_ROWS] /= scale
    return out
