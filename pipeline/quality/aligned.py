"""Crop-aligned similarity of image signatures: the third near-copy signal.

A copy that was cropped a little (an off-centre crop keeping 87-100 % of the side, resized
back) no longer lines up with its original pixel for pixel, and the 16 x 16 signature's
cosine falls to what distinct images of one class reach. Here each signature is also
compared after re-sampling one of the two at a grid of such crops (5 scales from 0.975 to
0.875 of the side, 6 x 6 positions each, and the identity): a pair's aligned similarity is
the best correlation over the grid, either image playing the cropped one. Distinct images
gain little from it (no small crop makes one the other), copies regain their near-1 cosine.

Measured on planted digits (sklearn, 128 px; docs/quality.md): cross-split copies found
0.875 -> 1.00; on the clean digits (224 px) the test samples called leaked 0.74 -> 0.93 %.
Photo crops gain nothing: their copies' aligned correlation stays under the floor that
distinct crops of one smooth photo set. Only images have it: a text's or a clip's
signature is no picture.

Scored only for each sample's few best candidates (``CANDIDATES`` by the features and as
many by the plain signature): a crop that moves a sample out of those is not found.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

SIDE = 16  # preprocess.SIGNATURE_SIDE
SCALES = (0.975, 0.95, 0.925, 0.9, 0.875)
POSITIONS = 6
CANDIDATES = 5
CHUNK = 16  # rows whose crops are made at a time (x 181 crops x 256 floats; measured fastest)


def _grid() -> list[tuple[float, float, float]]:
    """(scale, x, y) of each crop, in grid_sample's [-1, 1] coordinates."""
    out = []
    for k in SCALES:
        for ty in np.linspace(-(1 - k), 1 - k, POSITIONS):
            for tx in np.linspace(-(1 - k), 1 - k, POSITIONS):
                out.append((k, float(tx), float(ty)))
    return out


@functools.lru_cache(maxsize=1)
def _operators() -> tuple[Any, Any]:
    """Every crop of the grid (the identity first) as a linear map of a flattened 16 x 16
    image, bilinear with edges clamped (torch's grid_sample applied to the basis images):
    stacked, (crops x 256) x 256, as sparse matrices (4 taps a pixel), and their adjoints."""
    import torch
    from scipy import sparse

    d = SIDE * SIDE
    basis = torch.eye(d).view(d, 1, SIDE, SIDE)
    mats = []
    for k, tx, ty in [(1.0, 0.0, 0.0), *_grid()]:
        theta = torch.tensor([[k, 0.0, tx], [0.0, k, ty]]).expand(d, 2, 3)
        grid = torch.nn.functional.affine_grid(theta, [d, 1, SIDE, SIDE], align_corners=False)
        out = torch.nn.functional.grid_sample(basis, grid, mode="bilinear",
                                              padding_mode="border", align_corners=False)
        mats.append(out.flatten(1).numpy().T)  # column j: the crop of basis image j
    m = np.stack(mats)
    m[np.abs(m) < 1e-7] = 0.0
    return (sparse.csr_matrix(m.reshape(-1, d)),
            sparse.csr_matrix(m.transpose(0, 2, 1).reshape(-1, d)))


def _apply(op: Any, x: np.ndarray) -> np.ndarray:
    """(n, 256) images -> (n, crops, 256): each crop of each."""
    out = np.asarray(op @ x.T, np.float32).T  # (contiguous: BLAS multiplies it fast)
    return np.ascontiguousarray(out).reshape(len(x), -1, SIDE * SIDE)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    x = x - x.mean(axis=-1, keepdims=True)
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    return out


def scores(sigs: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """The aligned similarity of each row ``rows[i]`` of ``sigs`` ((n, 256) signatures) to
    each of its candidates ``cand[i]`` (-1: none, scored -inf): the best correlation of one
    signature with a crop of the other (either way round), over the grid and the identity.

    A crop's correlation with a centred signature b is (M a) . b / |centred M a| for the
    crop's linear map M, and a . (M b) = (M^T a) . b the other way round: so per row only
    its crops and adjoint crops are made, and each candidate's crop norms once."""
    if sigs.shape[1] != SIDE * SIDE:
        raise ValueError(f"signatures of {sigs.shape[1]} values: not {SIDE} x {SIDE} images")
    fwd, adj = _operators()
    s = _unit(sigs)
    rows = np.asarray(rows, np.int64)
    cand = np.asarray(cand, np.int64).reshape(len(rows), -1)
    safe = np.maximum(cand, 0)
    used = np.unique(np.concatenate([rows, safe.ravel()]))
    pos = np.zeros(len(s), np.int64)
    pos[used] = np.arange(len(used))
    norms = np.empty((len(used), fwd.shape[0] // (SIDE * SIDE)), np.float32)
    for c in range(0, len(used), CHUNK):  # each used row's crops, centred: their norms
        x = _apply(fwd, s[used[c:c + CHUNK]])
        total = x.sum(axis=2)
        norms[c:c + CHUNK] = np.sqrt(np.maximum(
            np.einsum("nvd,nvd->nv", x, x) - total * total / x.shape[2], 0.0))
    norms = np.maximum(norms, 1e-6)
    out = np.empty(cand.shape, np.float32)
    for c in range(0, len(rows), CHUNK):
        a = s[rows[c:c + CHUNK]]
        b = np.ascontiguousarray(s[safe[c:c + CHUNK]].transpose(0, 2, 1))  # (q, 256, c)
        crop_a = np.matmul(_apply(fwd, a), b)  # (q, crops, c): contiguous, so BLAS
        crop_a /= norms[pos[rows[c:c + CHUNK]]][:, :, None]
        crop_b = np.matmul(_apply(adj, a), b)
        crop_b /= norms[pos[safe[c:c + CHUNK]]].transpose(0, 2, 1)
        out[c:c + CHUNK] = np.maximum(crop_a.max(axis=1), crop_b.max(axis=1))
    out = np.clip(out, -1.0, 1.0)
    out[cand < 0] = -np.inf
    return out


def similarity(sigs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`scores` of the pairs (``sigs[a[i]]``, ``sigs[b[i]]``). Pairs that share their
    first member are scored as one row with several candidates: its crops are made once
    (the calibration asks each sampled image about its five nearest)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if not len(a):
        return np.zeros(0, np.float32)
    rows, inv = np.unique(a, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    slot = np.arange(len(a)) - np.repeat(np.cumsum(counts) - counts, counts)
    cand = np.full((len(rows), int(counts.max())), -1, np.int64)
    cand[inv[order], slot] = b[order]
    out = np.empty(len(a), np.float32)
    out[order] = scores(sigs, rows, cand)[inv[order], slot]
    return out


def candidates(*tables: np.ndarray | None, k: int = CANDIDATES) -> np.ndarray:
    """Each row's first ``k`` neighbours of every table, side by side (-1: none)."""
    cols = [t[:, :k] for t in tables if t is not None]
    return np.concatenate(cols, axis=1) if cols else np.zeros((0, 0), np.int64)


def table(query: Sequence[int] | np.ndarray, cand: np.ndarray,
          sigs: np.ndarray, sig_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The aligned neighbour table of the query samples: ``cand`` (rows x c sample indices,
    -1 none) scored by :func:`scores`, each candidate once, most similar first (-1 / -inf
    where fewer). ``sigs``: the signatures of the samples ``sig_idx`` (sorted)."""
    q = np.asarray(query, np.int64)
    nbr = np.asarray(cand, np.int64).copy()
    for c in range(1, nbr.shape[1]):  # a candidate found by both tables once
        nbr[:, c][(nbr[:, :c] == nbr[:, c:c + 1]).any(axis=1)] = -1
    have = np.isin(q, sig_idx)
    ok = (nbr >= 0) & (nbr != q[:, None]) & np.isin(nbr, sig_idx) & have[:, None]
    nbr[~ok] = -1
    sim = np.full(nbr.shape, -np.inf, np.float32)
    if ok.any():
        row = np.searchsorted(sig_idx, np.where(ok, nbr, sig_idx[0]))
        sim[have] = scores(np.asarray(sigs, np.float32), np.searchsorted(sig_idx, q[have]),
                           np.where(ok[have], row[have], -1))
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(nbr, order, axis=1), np.take_along_axis(sim, order, axis=1)
