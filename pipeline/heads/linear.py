"""The linear probe (head ``linear``): L2-regularised multinomial logistic regression on
standardized features.

Fitted full-batch with torch's L-BFGS (strong Wolfe line search). The loss is the mean
cross-entropy plus ``l2 / 2 * ||W||^2`` (bias not penalised), i.e. scikit-learn's
``LogisticRegression(C=1 / (l2 * n_samples))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.heads import register, save_head, standardize_stats, standardized


@dataclass
class LinearHead:
    """A fitted probe: feature standardization + linear layer, plus what it was trained on."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (classes, features)
    bias: np.ndarray  # (classes,)
    meta: dict[str, Any] = field(default_factory=dict)

    def logits(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        return np.asarray(z @ self.weight.T + self.bias)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        z = self.logits(features)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))

    def save(self, path: str | Path) -> None:
        """Tensors in a torch state dict (loadable with ``weights_only=True``) + JSON metadata."""
        save_head(path, "linear", {k: getattr(self, k) for k in ("mean", "scale", "weight",
                                                                 "bias")}, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        from pipeline.heads import load_head

        head = load_head(path)
        if not isinstance(head, LinearHead):
            raise ValueError(f"{path} holds a {type(head).__name__}, not a linear head")
        return head


@register("linear")
def _load(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> LinearHead:
    return LinearHead(**{k: arrays[k] for k in ("mean", "scale", "weight", "bias")}, meta=meta)


def fit_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float = 1e-3,
              max_iter: int = 500, tolerance: float = 1e-9) -> LinearHead:
    """Fit the probe. ``labels`` are class indices in ``[0, n_classes)``; L-BFGS stops
    after ``max_iter`` iterations or once the loss (or a step) changes by less than
    ``tolerance``."""
    import torch

    x = np.asarray(features)
    x = x if x.dtype in (np.float16, np.float32) else x.astype(np.float32)
    mean, scale = standardize_stats(x)
    xt = torch.from_numpy(standardized(x, mean, scale))
    yt = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    _lbfgs(xt, yt, w, b, l2, max_iter, tolerance)
    return LinearHead(mean=mean, scale=scale, weight=w.detach().numpy().copy(),
                      bias=b.detach().numpy().copy())


FINAL_FIT_ITERS = 3000  # L-BFGS iterations for the refit on train+val (stops at tolerance first)


def l2_grid(points: int = 45, low: float = 1e-6, high: float = 1e5) -> list[float]:
    """The regularization grid of Kornblith et al. 2019: log-spaced, strongest first."""
    return [float(v) for v in np.logspace(np.log10(high), np.log10(low), points)]


def sweep(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
          n_classes: int, grid: list[float], max_iter: int = 200) -> list[dict[str, float]]:
    """Fit the probe for each L2 value (in the given order, each warm-started from the last)
    and score it on the validation split. Returns one point per value:
    ``{"l2", "val_top1", "val_loss", "seconds"}``."""
    import time

    import torch

    x = np.asarray(x_train, dtype=np.float32)
    mean, scale = standardize_stats(x)
    xt = torch.from_numpy((x - mean) / scale)
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    xv = torch.from_numpy((np.asarray(x_val, dtype=np.float32) - mean) / scale)
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64))
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    curve = []
    for l2 in grid:
        t0 = time.perf_counter()
        _lbfgs(xt, yt, w, b, l2, max_iter)
        with torch.no_grad():
            logits = xv @ w.T + b
            curve.append({
                "l2": float(l2),
                "val_top1": float((logits.argmax(1) == yv).float().mean()),
                "val_loss": float(torch.nn.functional.cross_entropy(logits, yv)),
                "val_n": len(yv),
                "seconds": time.perf_counter() - t0,
            })
    return curve


def select(curve: list[dict[str, float]]) -> dict[str, float]:
    """The best point: among the penalties whose validation accuracy is within one standard
    error of the best (indistinguishable on this validation set), the lowest validation loss,
    then the strongest regularization. On a tiny validation split every penalty ties on
    accuracy; the loss then decides, so a head that predicts near-uniform probabilities (the
    strongest penalty) is never chosen when another predicts better."""
    best = max(p["val_top1"] for p in curve)
    se = standard_error(best, int(max(p.get("val_n", 0) for p in curve)))
    close = [p for p in curve if p["val_top1"] >= best - se]
    return min(close, key=lambda p: (p["val_loss"], -p["l2"]))


def standard_error(top1: float, n: int) -> float:
    """The standard error of an accuracy measured on ``n`` samples (0 when unknown)."""
    return float(np.sqrt(max(top1 * (1 - top1), 1e-12) / n)) if n else 0.0


def _lbfgs(xt: Any, yt: Any, w: Any, b: Any, l2: float, max_iter: int,
           tolerance: float = 1e-9) -> None:
    import torch

    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=tolerance,
                            line_search_fn="strong_wolfe")

    rows = torch.arange(len(yt))

    def closure() -> Any:
        # softmax regression's gradient in closed form: autograd's matmul backward made a
        # transposed copy of the features (+370 MB for 80k x 1280), the widest memory cost
        with torch.no_grad():
            z = torch.addmm(b, xt, w.t())
            loss = (torch.logsumexp(z, dim=1) - z[rows, yt]).mean() + 0.5 * l2 * (w * w).sum()
            p = torch.softmax(z, dim=1)
            p[rows, yt] -= 1.0
            p /= len(yt)
            w.grad = p.t().mm(xt).add_(w, alpha=l2)
            b.grad = p.sum(dim=0)
        return loss

    opt.step(closure)
