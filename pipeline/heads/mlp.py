"""The MLP head: standardize -> Linear -> ReLU -> Dropout -> Linear, trained with AdamW and
early stopping on validation accuracy (then loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.heads import register, save_head, standardize_stats


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
        save_head(path, "mlp", self.arrays, self.meta)


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
    if best_state is None:  # no epoch scored (cannot happen with epochs >= 1)
        raise ValueError("the MLP head trained no epoch")
    arrays = {"mean": mean, "scale": scale, "w1": best_state["1.weight"].numpy(),
              "b1": best_state["1.bias"].numpy(), "w2": best_state["4.weight"].numpy(),
              "b2": best_state["4.bias"].numpy()}
    return MLPHead(arrays, {"best_epoch": best_epoch, "val_top1": best[0],
                            "epochs_run": epoch + 1})




@register("mlp")
def _load(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> MLPHead:
    return MLPHead(arrays, meta)
