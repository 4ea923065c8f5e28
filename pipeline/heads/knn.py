"""The kNN head: cosine k-nearest neighbours; k chosen on validation; the probabilities are
the class shares among the k nearest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.heads import register, save_head

KNN_KS = (1, 3, 5, 7, 9, 11, 15, 21, 31)

@dataclass
class KNNHead:
    """Cosine k-nearest neighbours; probabilities are the class shares among the k."""

    reference: np.ndarray  # L2-normalized features (float16)
    labels: np.ndarray
    k: int
    n_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return _knn_proba(l2norm(features), self.reference.astype(np.float32), self.labels,
                          [self.k], self.n_classes)[self.k]

    def save(self, path: str | Path) -> None:
        save_head(path, "knn", {"reference": self.reference, "labels": self.labels},
              {**self.meta, "k": self.k, "n_classes": self.n_classes})


def l2norm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def _knn_proba(q: np.ndarray, ref: np.ndarray, labels: np.ndarray, ks: list[int],
               n_classes: int, chunk: int = 1024) -> dict[int, np.ndarray]:
    kmax = min(max(ks), len(ref))
    out = {k: np.zeros((len(q), n_classes), np.float32) for k in ks}
    for s in range(0, len(q), chunk):
        sim = q[s: s + chunk] @ ref.T
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :kmax]
        for k in ks:
            votes = labels[nearest[:, : min(k, kmax)]]
            for c in range(n_classes):
                out[k][s: s + chunk, c] = (votes == c).mean(axis=1)
    return out


def fit_knn(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray,
            n_classes: int) -> KNNHead:
    """Choose k on validation (reference = train), then use train+val as the reference."""
    ks = [k for k in KNN_KS if k <= len(x)] or [1]
    probs = _knn_proba(l2norm(xv), l2norm(x), np.asarray(y), ks, n_classes)
    scores = {k: float((p.argmax(1) == yv).mean()) for k, p in probs.items()}
    best = max(ks, key=lambda k: (scores[k], -k))
    ref = l2norm(np.concatenate([x, xv])).astype(np.float16)
    return KNNHead(ref, np.concatenate([y, yv]).astype(np.int64), best, n_classes,
                   {"val_top1_by_k": scores, "val_top1": scores[best]})


@register("knn")
def _load(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> KNNHead:
    return KNNHead(arrays["reference"], arrays["labels"], int(meta["k"]), int(meta["n_classes"]),
                   meta)
