"""Classifier heads on cached features, behind one small interface and a registry by name.

``linear`` (:class:`pipeline.probe.LinearHead`), ``mlp`` (one hidden layer, dropout, AdamW,
early stopping on validation) and ``knn`` (cosine k-nearest neighbours, k chosen on validation).
Every head has ``predict_proba(features)``, ``save(path)`` and is read back by
:func:`load_head`: torch state dicts with JSON metadata, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.probe import LinearHead, standardize_stats

KNN_KS = (1, 3, 5, 7, 9, 11, 15, 21, 31)


class Head(Protocol):
    meta: dict[str, Any]

    def predict_proba(self, features: np.ndarray) -> np.ndarray: ...

    def save(self, path: str | Path) -> None: ...


def _save(path: str | Path, kind: str, arrays: dict[str, np.ndarray],
          meta: dict[str, Any]) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                "kind": kind, "meta": json.dumps(meta)}, tmp)
    tmp.replace(path)


def load_head(path: str | Path) -> Any:
    """Read any saved head (safe: ``weights_only=True``)."""
    import torch

    raw = torch.load(path, map_location="cpu", weights_only=True)
    kind = raw.get("kind", "linear")
    meta = json.loads(raw["meta"])
    arrays = {k: v.numpy() for k, v in raw.items() if k not in ("kind", "meta")}
    if kind == "linear":
        return LinearHead(**arrays, meta=meta)
    if kind == "mlp":
        return MLPHead(arrays, meta)
    if kind == "knn":
        return KNNHead(arrays["reference"], arrays["labels"], int(meta["k"]),
                       int(meta["n_classes"]), meta)
    raise ValueError(f"unknown head kind {kind!r} in {path}")


# --- MLP --------------------------------------------------------------------------------


@dataclass
class MLPHead:
    """Standardize -> Linear -> ReLU -> Dropout -> Linear."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def _module(self) -> Any:
        import torch

        d, h = self.arrays["w1"].shape[1], self.arrays["w1"].shape[0]
        k = self.arrays["w2"].shape[0]
        net = _mlp(d, h, k, 0.0)
        net.load_state_dict({"1.weight": torch.from_numpy(self.arrays["w1"]),
                             "1.bias": torch.from_numpy(self.arrays["b1"]),
                             "4.weight": torch.from_numpy(self.arrays["w2"]),
                             "4.bias": torch.from_numpy(self.arrays["b2"])}, strict=False)
        return net.eval()

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        import torch

        z = (np.asarray(features, np.float32) - self.arrays["mean"]) / self.arrays["scale"]
        with torch.no_grad():
            return torch.softmax(self._module()(torch.from_numpy(z)), dim=1).numpy()

    def save(self, path: str | Path) -> None:
        _save(path, "mlp", self.arrays, self.meta)


def _mlp(d: int, h: int, k: int, dropout: float) -> Any:
    import torch

    return torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(d, h), torch.nn.ReLU(),
                               torch.nn.Dropout(dropout), torch.nn.Linear(h, k))


def fit_mlp(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, n_classes: int,
            hidden: int = 512, dropout: float = 0.5, epochs: int = 100, patience: int = 10,
            lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
            batch_size: int = 128) -> MLPHead:
    """Train on ``x``; keep the epoch with the best validation accuracy (then loss)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, scale = standardize_stats(np.asarray(x, np.float32))
    xt = torch.from_numpy((np.asarray(x, np.float32) - mean) / scale)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    xvt = torch.from_numpy((np.asarray(xv, np.float32) - mean) / scale)
    yvt = torch.from_numpy(np.asarray(yv, np.int64))
    net = _mlp(xt.shape[1], hidden, n_classes, dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    best: tuple[float, float] = (-1.0, 0.0)
    best_state = None
    best_epoch, since = 0, 0
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            logits = net(xvt)
            score = (float((logits.argmax(1) == yvt).float().mean()),
                     -float(torch.nn.functional.cross_entropy(logits, yvt)))
        if score > best:
            best, best_epoch, since = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    assert best_state is not None
    arrays = {"mean": mean, "scale": scale, "w1": best_state["1.weight"].numpy(),
              "b1": best_state["1.bias"].numpy(), "w2": best_state["4.weight"].numpy(),
              "b2": best_state["4.bias"].numpy()}
    return MLPHead(arrays, {"best_epoch": best_epoch, "val_top1": best[0],
                            "epochs_run": epoch + 1})


# --- kNN --------------------------------------------------------------------------------


@dataclass
class KNNHead:
    """Cosine k-nearest neighbours; probabilities are the class shares among the k."""

    reference: np.ndarray  # L2-normalized features (float16)
    labels: np.ndarray
    k: int
    n_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return _knn_proba(_l2norm(features), self.reference.astype(np.float32), self.labels,
                          [self.k], self.n_classes)[self.k]

    def save(self, path: str | Path) -> None:
        _save(path, "knn", {"reference": self.reference, "labels": self.labels},
              {**self.meta, "k": self.k, "n_classes": self.n_classes})


def _l2norm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
    probs = _knn_proba(_l2norm(xv), _l2norm(x), np.asarray(y), ks, n_classes)
    scores = {k: float((p.argmax(1) == yv).mean()) for k, p in probs.items()}
    best = max(ks, key=lambda k: (scores[k], -k))
    ref = _l2norm(np.concatenate([x, xv])).astype(np.float16)
    return KNNHead(ref, np.concatenate([y, yv]).astype(np.int64), best, n_classes,
                   {"val_top1_by_k": scores, "val_top1": scores[best]})
