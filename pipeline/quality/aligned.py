"""Crop-aligned similarity of image signatures: the third near-copy signal.

A copy that was cropped a little (an off-centre crop keeping 87-100 % of the side, resized
back) no longer lines up with its original pixel for pixel, and the 16 x 16 signature's
cosine falls to what distinct images of one class reach. Here each signature is also
compared after re-sampling one of the two at a grid of such crops (5 scales from 0.975 to
0.875 of the side, 6 x 6 positions each, and the identity): a pair's aligned similarity is
the best correlation over the grid, either image playing the cropped one. Distinct images
gain little from it (no small crop makes one the other), copies regain their near-1 cosine.

Measured offline on planted digits (sklearn, 128 px): near copies across splits over the
signal's natural-likeness floor 0.75 -> 1.00 (the plain signature vs this), the clean set's
test samples called leaked unchanged (0.37 %). Only images have it: a text's or a clip's
signature is no picture.

Scored only for each sample's few best candidates (``CANDIDATES`` by the features and as
many by the plain signature): a crop that moves a sample out of those is not found.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SIDE = 16  # preprocess.SIGNATURE_SIDE
SCALES = (0.975, 0.95, 0.925, 0.9, 0.875)
POSITIONS = 6
CANDIDATES = 5
CHUNK = 65536  # signatures re-sampled at a time (x 256 floats)


def _grid() -> list[tuple[float, float, float]]:
    """(scale, x, y) of each crop, in grid_sample's [-1, 1] coordinates."""
    out = []
    for k in SCALES:
        for ty in np.linspace(-(1 - k), 1 - k, POSITIONS):
            for tx in np.linspace(-(1 - k), 1 - k, POSITIONS):
                out.append((k, float(tx), float(ty)))
    return out


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean(dim=1, keepdim=True)
    out: torch.Tensor = v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return out


def similarity(sigs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The aligned similarity of each pair (``sigs[a[i]]``, ``sigs[b[i]]``): the best
    correlation of one signature with the other re-sampled at any crop of the grid (either
    way round), the plain cosine included. ``sigs``: (n, 256) signatures."""
    import torch

    s = torch.from_numpy(np.ascontiguousarray(sigs, np.float32))
    if s.shape[1] != SIDE * SIDE:
        raise ValueError(f"signatures of {s.shape[1]} values: not {SIDE} x {SIDE} images")
    plain = _unit(s)
    ta, tb = torch.from_numpy(np.asarray(a, np.int64)), torch.from_numpy(np.asarray(b, np.int64))
    plain_a, plain_b = plain[ta], plain[tb]
    best = (plain_a * plain_b).sum(dim=1)
    used = torch.unique(torch.cat([ta, tb]))
    pos = torch.full((len(s),), -1, dtype=torch.int64)
    pos[used] = torch.arange(len(used))
    pa, pb = pos[ta], pos[tb]
    img = s[used].view(-1, 1, SIDE, SIDE)
    with torch.inference_mode():
        for k, tx, ty in _grid():
            crops = torch.empty(len(used), SIDE * SIDE)
            for c in range(0, len(used), CHUNK):
                part = img[c:c + CHUNK]
                theta = torch.tensor([[k, 0.0, tx], [0.0, k, ty]]).expand(len(part), 2, 3)
                grid = torch.nn.functional.affine_grid(theta, list(part.shape),
                                                       align_corners=False)
                crops[c:c + CHUNK] = torch.nn.functional.grid_sample(
                    part, grid, mode="bilinear", padding_mode="border",
                    align_corners=False).flatten(1)
            crops = _unit(crops)
            got = torch.maximum((crops[pa] * plain_b).sum(dim=1),
                                (plain_a * crops[pb]).sum(dim=1))
            best = torch.maximum(best, got)
    out: np.ndarray = best.clamp(-1.0, 1.0).numpy().astype(np.float32)
    return out


def candidates(*tables: np.ndarray | None, k: int = CANDIDATES) -> np.ndarray:
    """Each row's first ``k`` neighbours of every table, side by side (-1: none)."""
    cols = [t[:, :k] for t in tables if t is not None]
    return np.concatenate(cols, axis=1) if cols else np.zeros((0, 0), np.int64)


def table(query: Sequence[int] | np.ndarray, cand: np.ndarray,
          sigs_of: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The aligned neighbour table of the query rows: ``cand`` (rows x c sample indices, -1
    none) scored by :func:`similarity`, duplicates dropped, most similar first (-1 / -inf
    where fewer). ``sigs_of``: every index's signature."""
    keys = sorted(sigs_of)
    row_of = {i: r for r, i in enumerate(keys)}
    sigs = np.stack([sigs_of[i] for i in keys]) if keys else np.zeros((0, SIDE * SIDE))
    q = np.asarray(query, np.int64)
    nbr = np.asarray(cand, np.int64).copy()
    for c in range(1, nbr.shape[1]):  # a candidate found by both tables once
        nbr[:, c][(nbr[:, :c] == nbr[:, c:c + 1]).any(axis=1)] = -1
    ok = (nbr >= 0) & (nbr != q[:, None]) & np.isin(nbr, keys) & np.isin(q, keys)[:, None]
    sim = np.full(nbr.shape, -np.inf, np.float32)
    rows, cols = np.nonzero(ok)
    if len(rows):
        a = np.asarray([row_of[int(i)] for i in q[rows]], np.int64)
        b = np.asarray([row_of[int(i)] for i in nbr[rows, cols]], np.int64)
        sim[rows, cols] = similarity(sigs, a, b)
    nbr[~ok] = -1
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(nbr, order, axis=1), np.take_along_axis(sim, order, axis=1)
