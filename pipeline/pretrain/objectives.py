"""The objectives: SimCLR's NT-Xent over every rank's embeddings, BYOL's prediction error,
and reconstruction error."""

from __future__ import annotations

from typing import Any

from pipeline.engine.dist import Rank


def nt_xent(z1: Any, z2: Any, rank: Rank, temperature: float) -> Any:
    """NT-Xent (SimCLR) for this rank's two views ``z1``, ``z2`` (n x d each), contrasted with
    the views of *every* rank: each sample's positive is its other view, its negatives are the
    2N - 2 other views of the global batch (N = n x world size), not only this rank's 2n - 2.
    Gradients reach the other ranks' embeddings through the gather."""
    import torch
    import torch.nn.functional as F

    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    a1, a2 = rank.gather(z1), rank.gather(z2)
    n, big_n = z1.shape[0], a1.shape[0]
    rows = torch.cat([z1, z2])  # this rank's 2n views
    cols = torch.cat([a1, a2])  # all 2N views
    logits = rows @ cols.T / temperature
    idx = torch.arange(n, device=z1.device)
    own = rank.rank * n + idx
    self_cols = torch.cat([own, big_n + own])
    positive = torch.cat([big_n + own, own])
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(2 * n, device=z1.device), self_cols] = True
    return F.cross_entropy(logits.masked_fill(mask, float("-inf")), positive)


def byol(p: Any, t: Any) -> Any:
    """BYOL's symmetric loss for ``2n`` views (first half view 1, second half view 2): each
    view's online prediction against the target's projection of the *other* view,
    ``2 - 2 cos``, averaged. No negatives, so nothing is gathered across ranks."""
    import torch
    import torch.nn.functional as F

    n = p.shape[0] // 2
    p = F.normalize(p.float(), dim=1)
    t = F.normalize(t.float(), dim=1)
    other = torch.cat([t[n:], t[:n]])
    return (2 - 2 * (p * other).sum(dim=1)).mean()


def reconstruction(recon: Any, target: Any) -> Any:
    """Mean squared error ‖x − g(f(x))‖² per pixel (normalized units)."""
    import torch.nn.functional as F

    return F.mse_loss(recon.float(), target.float())
