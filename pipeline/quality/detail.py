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
scale and its neighbours, offsets within 2 pixels, at 64 x 64; then, for pairs that reach
``REFINE_FROM``, between the pixels (:func:`_refine`: half, then a quarter of a pixel
either way, the scale +-0.005 then 0.0025). A crop edit rarely lands on the grid, and this
band is fine enough that half a pixel off costs a copy much of its correlation: on photo
crops at 224 px the crop edit's copies scored 0.83 at their 1st percentile on whole
pixels, 0.90 refined (round 24-11).

Measured on photo crops (scikit-image's photos, 128 px, 150 planted copies; a written-out
search with ``skimage.feature.match_template``): copies' 5th percentile 0.94, distinct
same-class nearest neighbours' median 0.37 (the thumbnail's: 0.99); the distinct pairs that
pass 0.94 all share pixels (crops overlapping by IoU 0.6-0.9). Scored only for each sample's
best candidates (``CANDIDATES``): a copy that none of the other signals ranks near is not
found.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
SUBPIXEL = (0.5, 0.25)  # the refinement's moves: offsets (pixels at 64), larger first...
SUBPIXEL_SCALE = (0.005, 0.0025)  # ...and scales (12 resamplings a pair, and the start)
SECOND_FROM = 0.9  # the quarter-pixel moves only for pairs the half-pixel ones put this high
RIM = 2  # pixels at the edge the refinement leaves out (resampled past the region)
REFINE_FROM = 0.8  # pairs the whole-pixel search puts this high are refined (it gained crop
# copies 0.094 at most: a pair below stays under 0.9, about the lowest floor measured)
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


def _fine(a: Any, b: Any, k0: Any, dy: Any, dx: Any) -> tuple[Any, Any, Any, Any]:
    """The best correlation near the coarse answer (``SCALES`` within 0.02 of ``COARSE``
    [``k0``], offsets within ``FINE`` pixels of ``2 dy``, ``2 dx``) at full size: each
    pair's region of ``a`` and its shrunk ``b`` as one grouped convolution. Returns it, and
    where: the scale (``m / 64``) and the offset (y, x) of ``b`` shrunk inside ``a``."""
    import torch

    s = a.shape[-1]
    best = torch.full((len(a),), -1.0)
    where = torch.zeros((3, len(a)))
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
        v, arg = (corr / var.sqrt()).flatten(1).max(dim=1)
        up = v > best[near]
        won = near[up]
        best[won] = v[up]
        where[0, won] = m / s
        where[1, won] = (y0 + arg // n_o)[up].float()
        where[2, won] = (x0 + arg % n_o)[up].float()
    return best, where[0], where[1], where[2]


def _refine(a: Any, b: Any, scale: Any, y: Any, x: Any) -> Any:
    """The best correlation of ``b`` with ``a``'s region at the fine answer (``scale``,
    offset ``y``, ``x`` in pixels) and around it, between the pixels: ``a``'s region
    resampled onto ``b``'s grid (bilinear), the outer ``RIM`` pixels left out; moved by
    ``SUBPIXEL`` up or down, left or right, and by ``SUBPIXEL_SCALE`` in scale, half a pixel
    first, then, where that reaches ``SECOND_FROM``, a quarter, each move kept where it
    correlates better. Measured (the quarter pixel for every pair) on 300 crop
    copies of photo crops at 224 px against a grid of 175 resamplings (+-0.75 pixel,
    +-0.01 in scale): 0.003 short on average, 0.0125 at the 95th percentile (the half
    pixel moves alone: 0.008 and 0.027)."""
    import torch

    n, s = len(a), a.shape[-1]
    inner = _unit(b[:, RIM:s - RIM, RIM:s - RIM]).flatten(1)

    base = (2 * torch.arange(s, dtype=torch.float32) + 1) / s - 1  # pixel centres, -1..1

    def ncc(k: Any, yy: Any, xx: Any) -> Any:
        # the sampling grid of the scale-and-shift (what affine_grid makes, ~4x faster)
        gx = k[:, None] * base + (2 * xx / s + k - 1)[:, None]
        gy = k[:, None] * base + (2 * yy / s + k - 1)[:, None]
        grid = torch.stack([gx[:, None, :].expand(n, s, s), gy[:, :, None].expand(n, s, s)],
                           dim=-1)
        w = torch.nn.functional.grid_sample(a[:, None], grid, mode="bilinear",
                                            padding_mode="border", align_corners=False)
        return (_unit(w[:, 0, RIM:s - RIM, RIM:s - RIM]).flatten(1) * inner).sum(1)

    def moves(best: Any, step: float, by: float) -> Any:
        nonlocal y, x, scale
        for move in ((step, 0.0, 0.0), (0.0, step, 0.0), (0.0, 0.0, by)):
            for sign in (-1, 1):
                to = (y + sign * move[0], x + sign * move[1], scale + sign * move[2])
                v = ncc(to[2], to[0], to[1])
                up = v > best
                y, x, scale = (torch.where(up, t, o) for t, o in zip(to, (y, x, scale),
                                                                     strict=True))
                best = torch.maximum(best, v)
        return best

    best = moves(ncc(scale, y, x), SUBPIXEL[0], SUBPIXEL_SCALE[0])
    close = torch.nonzero(best >= SECOND_FROM).ravel()  # the quarter pixel where it counts
    if len(close):  # (``ncc`` and ``moves`` read these names: now those pairs only)
        n, a, inner, y, x, scale = (len(close), a[close], inner[close], y[close], x[close],
                                    scale[close])
        best[close] = moves(best[close], SUBPIXEL[1], SUBPIXEL_SCALE[1])
    return best


def _scores(band: Any, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole-pixel search of the pairs (``band[ia[i]]``, ``band[ib[i]]``) (the coarse
    templates made once a picture): each pair's best correlation, and where (rows: which
    picture is shrunk (1: the first), its scale, offset y, x)."""
    import torch

    out = np.empty(len(ia), np.float32)
    where = np.empty((len(ia), 4), np.float32)
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
            best, *at = _fine(big, small, k0, dy, dx)
            out[c:c + CHUNK] = best.clamp(-1, 1).numpy()
            where[c:c + CHUNK] = torch.stack([flip.float(), *at], dim=1).numpy()
    return out, where


def _refined(band: Any, ia: np.ndarray, ib: np.ndarray, got: np.ndarray,
             where: np.ndarray) -> np.ndarray:
    """``got`` (:func:`_scores` of the pairs), each refined between the pixels
    (:func:`_refine`, from ``where``) where that correlates better."""
    import torch

    out = np.asarray(got, np.float32).copy()
    with torch.inference_mode():
        for c in range(0, len(ia), CHUNK):
            k = slice(c, c + CHUNK)
            flip = torch.from_numpy(where[k, 0] > 0)[:, None, None]
            x, y = band[torch.from_numpy(ia[k])], band[torch.from_numpy(ib[k])]
            at = torch.from_numpy(np.ascontiguousarray(where[k, 1:].T))
            better = _refine(torch.where(flip, y, x), torch.where(flip, x, y), *at)
            out[k] = np.maximum(out[k], better.clamp(-1, 1).numpy())
    return out


def similarity(details: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The aligned fine-detail similarity of each pair of rows (``details[a[i]]``,
    ``details[b[i]]``): the best correlation of one picture, band-passed (:func:`bandpass`),
    shrunk inside the other, either way round, searched coarse to fine (:func:`search`),
    then between the pixels where that reaches ``REFINE_FROM`` (:func:`refine`)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    out = np.zeros(len(a), np.float32)
    for at, band, ia, ib in _blocks(details, a, b):  # (each block band-passed once)
        got, where = _scores(band, ia, ib)
        close = got >= REFINE_FROM
        got[close] = _refined(band, ia[close], ib[close], got[close], where[close])
        out[at] = got
    return out


def best_of(details: np.ndarray, a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """For each run of ``k`` pairs, the best :func:`similarity`: the whole-pixel search of
    all, the refinement of each run's best only."""
    got, where = search(details, a, b)
    top = np.zeros((len(got) // k, k), bool)
    top[np.arange(len(top)), got.reshape(-1, k).argmax(axis=1)] = True
    out = refine(details, a, b, got, where, top.ravel() & (got >= REFINE_FROM))
    return np.asarray(out.reshape(-1, k).max(axis=1))


def search(details: np.ndarray, a: np.ndarray,
           b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole-pixel search (:func:`_scores`) of the rows' pairs, with each picture
    band-passed once when the pairs hold at most ``AT_ONCE``, else block by block."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    out, where = np.zeros(len(a), np.float32), np.zeros((len(a), 4), np.float32)
    for at, band, ia, ib in _blocks(details, a, b):
        out[at], where[at] = _scores(band, ia, ib)
    return out, where


def refine(details: np.ndarray, a: np.ndarray, b: np.ndarray, got: np.ndarray,
           where: np.ndarray, which: np.ndarray) -> np.ndarray:
    """``got`` (:func:`search`'s scores; ``where``: its answers), the pairs ``which``
    refined between the pixels (:func:`_refine`)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    out = np.asarray(got, np.float32).copy()
    k = np.flatnonzero(which)
    for at, band, ia, ib in _blocks(details, a[k], b[k]):
        out[k[at]] = _refined(band, ia, ib, out[k[at]], where[k[at]])
    return out


def _blocks(details: np.ndarray, a: np.ndarray,
            b: np.ndarray) -> Iterator[tuple[np.ndarray, Any, np.ndarray, np.ndarray]]:
    """The pairs in blocks (every pair at once when they hold at most ``AT_ONCE``
    pictures, else ``BLOCK`` pairs sharing their first pictures): each block's pairs, its
    pictures band-passed, and the pairs' rows among them."""
    one = len(np.unique(np.concatenate([a, b]))) <= AT_ONCE
    size = max(1, len(a)) if one else BLOCK
    order = np.argsort(a, kind="stable")
    for s in range(0, len(a), size):
        at = order[s:s + size]
        used, inv = np.unique(np.concatenate([a[at], b[at]]), return_inverse=True)
        yield at, bandpass(np.asarray(details)[used]), inv[:len(at)], inv[len(at):]


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
        got, where = search(details, rows[:, 0], rows[:, 1])
        sim[r, col] = got[inv.ravel()]
        # refined between the pixels: each row's best two (what the ratio test and the
        # floor read), where the whole-pixel search puts them high enough
        top = np.argsort(-sim, axis=1, kind="stable")[:, :2]
        slot = np.full(nbr.shape, -1, np.int64)
        slot[r, col] = inv.ravel()
        mine = np.take_along_axis(slot, top, axis=1).ravel()
        which = np.zeros(len(pairs), bool)
        which[mine[mine >= 0]] = True
        sim[r, col] = refine(details, rows[:, 0], rows[:, 1], got, where,
                             which & (got >= REFINE_FROM))[inv.ravel()]
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(nbr, order, axis=1), np.take_along_axis(sim, order, axis=1)
