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

from pipeline.errors import FeaturefleetError, short
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
    kinds()
    raw = load_tensors(path, "featurefleet head file", "pass a head.pt written by a "
                       "featurefleet job (or the job's folder)")
    kind = raw.get("kind", "linear")
    try:
        meta = json.loads(raw["meta"])
    except (KeyError, TypeError, ValueError):
        raise FeaturefleetError(f"{str(path)!r} is a torch file but not a featurefleet head "
                                "(no metadata); fix: pass a head.pt written by a featurefleet "
                                "job") from None
    arrays = {k: v.numpy() for k, v in raw.items() if k not in ("kind", "meta")}
    if kind not in _LOADERS:
        raise FeaturefleetError(f"unknown head kind {short(kind)} in {str(path)!r}; fix: pass a "
                                "head.pt written by this version of featurefleet")
    return _LOADERS[kind](arrays, meta)


CHUNK_ROWS = 2048  # rows standardized at a time: no temporary as large as the data


def standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of ``x`` (any float dtype; accumulated in float64, in row
    chunks); constant features get scale 1, since they carry nothing and must not be divided
    by zero. "Constant" is relative to the largest feature scale: an untrained network's
    features can all be ~1e-10 (vanishing activations) and still separate the classes."""
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
    scale[scale <= 1e-6 * scale.max(initial=0.0)] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def standardized(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - mean) / scale`` as a new float32 array, written in row chunks (``x`` may be
    float16: only the result is full-size float32)."""
    out = np.empty(x.shape, np.float32)
    for s in range(0, len(x), CHUNK_ROWS):
        np.subtract(x[s:s + CHUNK_ROWS], mean, out=out[s:s + CHUNK_ROWS], dtype=np.float32)
        out[s:s + CHUNK_ROWS] /= scale
    return out


def load_tensors(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A file written with ``torch.save`` of a dict, loaded safely (``weights_only=True``:
    a pickle that would run code is refused, not executed).

    Raises:
        FeaturefleetError: missing, unreadable, not a dict, or refused by the safe loader
            (the message names ``what`` the file should be and the ``fix``).
    """
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FeaturefleetError(f"no {what} at {str(path)!r}; fix: {fix}") from None
    except Exception as exc:  # UnpicklingError (a pickle torch refuses to run), zip errors...
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise FeaturefleetError(f"{str(path)!r} is not a {what} that loads safely "
                                f"({type(exc).__name__}: {first}); fix: {fix}") from None
    if not isinstance(raw, dict):
        raise FeaturefleetError(f"{str(path)!r} holds a {type(raw).__name__}, not a {what}; "
                                f"fix: {fix}")
    return raw
