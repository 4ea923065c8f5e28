"""Fine detail, aligned: the fourth near-copy signal (images).

The other signals see a 16 x 16 thumbnail or the backbone's features. Distinct crops of one
smooth photo, or of one texture, look alike in both (their thumbnails correlate at 0.99 and
more), so the floor that distinct same-class samples set lies above what a real copy of
such an image reaches, and the copy is missed. Their fine detail tells them apart: a copy
holds the same grain, edges and specks as its original, a distinct crop does not.

Extraction stores each image as a 64 x 64 grey picture (``preprocess.details``, uint8). Here
two of them are compared band-passed (a difference of Gaussians, sigma 0.7 and 4 pixels:
brightness, contrast and the smooth shading drop out, the grain stays) by their normalized
cross-correlation, at the best alignment: one picture shrunk to ``SCALES`` of the side (an
off-centre crop keeping 86-100 % of it) and slid over the other, either way round. The
search runs coarse to fine: every other scale and every offset at 32 x 32, then the best
scale and its neighbours, offsets within 2 pixels, at 64 x 64.

Measured on photo crops (scikit-image's photos, 128 px, 150 planted copies; a written-out
search with ``skimage.feature.match_template``): copies' 5th percentile 0.94, distinct
same-class nearest neighbours' median 0.37 (the thumbnail's: 0.99); the distinct pairs that
pass 0.94 all share pixels (crops overlapping by IoU 0.6-0.9). Scored only for each sample's
best candidates (``CANDIDATES``): a copy that none of the other signals ranks near is not
found.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SIDE = 64  # preprocess.DETAIL_SIDE
SCALES = (0.86, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 1.0)
COARSE = (0.86, 0.9, 0.94, 0.98, 1.0)  # the coarse pass's; the fine one tries +- 0.02
SIGMAS = (0.7, 4.0)  # the band: a difference of these two Gaussian blurs (pixels at 64)
FINE_SCALE = 0.021  # the fine search: scales this near the coarse best
FINE = 2  # the fine search: offsets within this many pixels of the coarse best, x 2
CANDIDATES = 2  # each sample's best by the aligned thumbnail, and its best by the features
# (two of each: the ratio test, standout.py, compares a sample's best with its second best)
CHUNK = 256  # pairs scored at a time (the fine search holds 25 windows of each)
BLOCK = 2048  # pairs whose pictures are band-passed at a time (at most 2 x 16 KB each)
AT_ONCE = 4096  # pictures band-passed together when all the pairs hold no more (64 MB)


def bandpass(details: np.ndarray) -> Any:
    """(n, 4096) stored pictures -> (n, 64, 64) float32 tensor: their band (``SIGMAS``)."""
    import torch
    from scipy.ndimage import gaussian_filter

    d = np.asarray(details)
    if d.ndim != 2 or d.shape[1] != SIDE * SIDE:
        raise ValueError(f"details of shape {d.shape}: not {SIDE} x {SIDE} pictures")
    x = d.astype(np.float32).reshape(-1, SIDE, SIDE)
    band = gaussian_filter(x, (0.0, SIGMAS[0], SIGMAS[0]), mode="reflect")
    band -= gaussian_filter(x, (0.0, SIGMAS[1], SIGMAS[1]), mode="reflect", output=x)
    return torch.from_numpy(band)


def _unit(t: Any) -> Any:
    t = t - t.mean(dim=(-2, -1), keepdim=True)
    return t / t.flatten(-2).norm(dim=-1).clamp_min(1e-6)[..., None, None]


def _shrunk(b: Any, m: int) -> Any:
    import torch

    if m >= b.shape[-1]:
        return b
    return torch.nn.functional.interpolate(b[:, None], size=(m, m), mode="bilinear",
                                           antialias=True, align_corners=False)[:, 0]


def _templates(b: Any) -> list[Any]:
    """Each picture of ``b`` ((n, s, s)) shrunk to every ``COARSE`` scale, centred, unit
    norm: what :func:`_coarse` slides (made once a picture, not once a pair)."""
    s = b.shape[-1]
    return [_unit(_shrunk(b, round(s * scale))) for scale in COARSE]


def _coarse(a: Any, tb: list[Any]) -> tuple[Any, Any, Any, Any]:
    """Every scale and offset of ``b`` shrunk inside ``a`` ((P, s, s); ``tb``: ``b``'s
    :func:`_templates`): the best normalized cross-correlation per pair, and its scale
    index and offset (dy, dx)."""
    import torch

    s = a.shape[-1]
    c1, c2 = _integral(a)
    best = torch.full((len(a),), -2.0)
    arg = torch.zeros((3, len(a)), dtype=torch.long)
    for k, scale in enumerate(COARSE):
        m = round(s * scale)
        o = s - m + 1
        t = tb[k]
        corr = torch.nn.functional.conv2d(a[None], t[:, None], groups=len(a))[0]
        ncc = (corr / _window_var(c1, c2, m, o).sqrt()).flatten(1)
        v, at = ncc.max(dim=1)
        better = v > best
        best = torch.where(better, v, best)
        arg[0] = torch.where(better, k, arg[0])
        arg[1] = torch.where(better, at // o, arg[1])
        arg[2] = torch.where(better, at % o, arg[2])
    return best, arg[0], arg[1], arg[2]


def _window_var(c1: Any, c2: Any, m: int, o: int) -> Any:
    """Each m x m window's centred sum of squares at the o x o offsets, from the integral
    images of a picture (``c1``) and of its square (``c2``)."""
    def window(c: Any) -> Any:
        return c[:, m:m + o, m:m + o] - c[:, :o, m:m + o] - c[:, m:m + o, :o] + c[:, :o, :o]

    s1 = window(c1)
    return (window(c2) - s1 * s1 / (m * m)).clamp_min(1e-6)


def _integral(a: Any) -> tuple[Any, Any]:
    import torch

    pad = (1, 0, 1, 0)
    return (torch.nn.functional.pad(a.cumsum(1).cumsum(2), pad),
            torch.nn.functional.pad((a * a).cumsum(1).cumsum(2), pad))


def _fine(a: Any, b: Any, k0: Any, dy: Any, dx: Any) -> Any:
    """The best correlation near the coarse answer (``SCALES`` within 0.02 of ``COARSE``
    [``k0``], offsets within
    ``FINE`` pixels of ``2 dy``, ``2 dx``) at full size: each pair's region of ``a`` and its
    shrunk ``b`` as one grouped convolution."""
    import torch

    s = a.shape[-1]
    best = torch.full((len(a),), -1.0)
    coarse = torch.tensor(COARSE)[k0]
    c1, c2 = _integral(a)  # once: every scale's window sums come from them
    for scale in SCALES:
        near = torch.nonzero((coarse - scale).abs() <= FINE_SCALE).ravel()
        if not len(near):
            continue
        m = round(s * scale)
        o = s - m + 1
        n_o = min(2 * FINE + 1, o)
        r = m + n_o - 1
        y0 = (2 * dy[near] - FINE).clamp(0, o - n_o)
        x0 = (2 * dx[near] - FINE).clamp(0, o - n_o)
        at = torch.arange(len(near))
        regions = a[near].unfold(1, r, 1).unfold(2, r, 1)[at, y0, x0]
        t = _unit(_shrunk(b[near], m))
        corr = torch.nn.functional.conv2d(regions[None], t[:, None], groups=len(near))[0]
        var = _window_var(c1[near], c2[near], m, o).unfold(1, n_o, 1).unfold(2, n_o, 1)[
            at, y0, x0]
        ncc = (corr / var.sqrt()).flatten(1)
        best[near] = torch.maximum(best[near], ncc.max(dim=1).values)
    return best


def pair_scores(a: Any, b: Any) -> np.ndarray:
    """The aligned fine-detail similarity of each pair (``a[i]``, ``b[i]``), band-passed
    (:func:`bandpass`) pictures: the best correlation of one shrunk inside the other, either
    way round, searched coarse to fine."""
    import torch

    n = len(a)
    return _scores(torch.cat([a, b]), np.arange(n), n + np.arange(n))


def _scores(band: Any, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """:func:`pair_scores` of the pairs (``band[ia[i]]``, ``band[ib[i]]``): the coarse
    templates made once a picture."""
    import torch

    out = np.empty(len(ia), np.float32)
    with torch.inference_mode():
        half = torch.nn.functional.avg_pool2d(band[:, None], 2)[:, 0]
        tmpl = _templates(half)
        for c in range(0, len(ia), CHUNK):
            i, j = torch.from_numpy(ia[c:c + CHUNK]), torch.from_numpy(ib[c:c + CHUNK])
            x, y = band[i], band[j]
            fwd = _coarse(half[i], [t[j] for t in tmpl])
            back = _coarse(half[j], [t[i] for t in tmpl])
            flip = back[0] > fwd[0]  # which picture is the shrunk one
            big = torch.where(flip[:, None, None], y, x)
            small = torch.where(flip[:, None, None], x, y)
            k0, dy, dx = (torch.where(flip, q, p) for p, q in zip(fwd[1:], back[1:],
                                                                    strict=True))
            out[c:c + CHUNK] = _fine(big, small, k0, dy, dx).clamp(-1, 1).numpy()
    return out


def similarity(details: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`pair_scores` of the rows (``details[a[i]]``, ``details[b[i]]``)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    out = np.zeros(len(a), np.float32)
    used, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    if len(used) <= AT_ONCE:  # every picture band-passed once
        return _scores(bandpass(np.asarray(details)[used]), inv[:len(a)], inv[len(a):])
    order = np.argsort(a, kind="stable")  # a block's pairs share their first pictures
    for s in range(0, len(a), BLOCK):
        at = order[s:s + BLOCK]
        used, inv = np.unique(np.concatenate([a[at], b[at]]), return_inverse=True)
        band = bandpass(np.asarray(details)[used])
        out[at] = _scores(band, inv[:len(at)], inv[len(at):])
    return out


def candidates(al_nbr: np.ndarray | None, nbr: np.ndarray) -> np.ndarray:
    """Each row's ``CANDIDATES`` best by the aligned thumbnail and as many by the
    features, side by side (-1: none)."""
    cols = [nbr[:, :CANDIDATES]]
    if al_nbr is not None:
        cols.insert(0, al_nbr[:, :CANDIDATES])
    return np.concatenate(cols, axis=1)


def table(query: Sequence[int] | np.ndarray, cand: np.ndarray, details: np.ndarray,
          detail_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fine-detail neighbour table of the query samples: ``cand`` (rows x c sample
    indices, -1 none) scored by :func:`similarity`, each pair once, most similar first
    (-1 / -inf where fewer). ``details``: the pictures of the samples ``detail_idx``
    (sorted)."""
    q = np.asarray(query, np.int64)
    nbr = np.asarray(cand, np.int64).copy()
    for c in range(1, nbr.shape[1]):  # a candidate found twice once
        nbr[:, c][(nbr[:, :c] == nbr[:, c:c + 1]).any(axis=1)] = -1
    ok = (nbr >= 0) & (nbr != q[:, None]) & np.isin(nbr, detail_idx) & np.isin(
        q, detail_idx)[:, None]
    nbr[~ok] = -1
    sim = np.full(nbr.shape, -np.inf, np.float32)
    r, col = np.nonzero(ok)
    if len(r):
        a, b = q[r], nbr[r, col]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        pairs, inv = np.unique(np.stack([lo, hi], axis=1), axis=0, return_inverse=True)
        rows = np.searchsorted(detail_idx, pairs)
        sim[r, col] = similarity(details, rows[:, 0], rows[:, 1])[inv.ravel()]
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(nbr, order, axis=1), np.take_along_axis(sim, order, axis=1)
