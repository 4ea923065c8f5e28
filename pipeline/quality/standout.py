"""A near copy that stands out from its sample's other candidates (images: the fine detail).

The natural-likeness floor (:func:`summary.natural_likeness`) asks how alike distinct
same-class samples of the whole data set get. Where many of them are genuinely close —
crops of one photo that overlap, frames of one scene — the floor rises above what a copy
with an edit or two reaches, and the copy is missed, although its original has nothing
else nearly as close. This is the ratio test of feature matching (Lowe 2004: a match
counts when its best candidate is much nearer than the second best), asked of each
sample's fine-detail table (:mod:`detail`, best candidates first): with ``s1`` and ``s2``
its best two similarities, the pair of the best stands out when

- ``s1`` reaches what 99 % of the calibration copies reach (``copy_similarity.p1``: it
  looks like a copy at all), and
- ``log(1 - s1) - log(1 - s2)`` is below what the data's own samples reach 0.1 % of the
  time: the normal fitted by median and MAD to that gap over every training sample with
  two candidates (:data:`summary.NATURAL_Z`), robust to the real copies in its tail, as
  the floor's fit is.

The fitted tail is the rule's false-positive rate (0.1 % of samples by construction, on
the fit's terms); the share of training samples that pass is its counted rate (real
copies inside train included): both join the leak call's false-leak rates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.quality.neighbors import Neighbors
from pipeline.quality.summary import NATURAL_Z, Pair, robust_normal

MIN_ROWS = 20  # training samples with two candidates needed for a fit


def gaps(nb: Neighbors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of the detail table: its best candidate (-1: fewer than two), that
    similarity, and the gap ``log(1 - s1) - log(1 - s2)`` to the second best (NaN: none)."""
    n = len(nb.idx)
    if nb.dt_nbr is None or nb.dt_sim is None or nb.dt_nbr.shape[1] < 2:
        return np.full(n, -1, np.int64), np.full(n, np.nan), np.full(n, np.nan)
    ok = (nb.dt_nbr[:, :2] >= 0).all(axis=1) & np.isfinite(nb.dt_sim[:, :2]).all(axis=1)
    s = np.clip(nb.dt_sim[:, :2].astype(np.float64), -1.0, 1.0)
    d = np.log(np.clip(1.0 - s, 1e-6, None))
    gap = np.where(ok, d[:, 0] - d[:, 1], np.nan)
    return np.where(ok, nb.dt_nbr[:, 0], -1), np.where(ok, s[:, 0], np.nan), gap


def fit(gap: np.ndarray, train_rows: np.ndarray) -> dict[str, Any] | str:
    """The gap (:func:`gaps`) a sample's best candidate stands out by, fitted over the
    training rows (``train_rows``: a mask over the rows): the threshold (the fitted 0.1 %
    tail) and the fit, or why there is none."""
    g = gap[train_rows & np.isfinite(gap)]
    if len(g) < MIN_ROWS:
        return f"{len(g)} training samples with two fine-detail candidates: too few to fit"
    mu, sd = robust_normal(g)
    if sd <= 0:
        return "no spread in how far the best candidates stand out"
    thr = mu - NATURAL_Z * sd
    return {"gap": round(thr, 5), "ratio": round(float(np.exp(thr)), 5),
            "median_ratio": round(float(np.exp(mu)), 5), "samples": len(g)}


TAIL = 0.001  # the fitted false-positive rate of the rule: NATURAL_Z's one-sided tail


def apply(found: list[Pair], nb: Neighbors, cal: dict[str, Any],
          train_rows: np.ndarray) -> tuple[list[Pair], dict[str, Any], np.ndarray]:
    """``found`` plus every row's best candidate that stands out (found by "standout"),
    sorted as :func:`summary.pairs` sorts; what the section says of the rule (its
    threshold, the counted and fitted rates the leak call adds; or why it is not used:
    no fine-detail signal calibrated and in use, too few training samples); and which rows
    passed (similarity at least the copies' ``p1``, a gap at most the fitted one)."""
    none = np.zeros(len(nb.idx), bool)
    floor = (cal.get("copy_similarity") or {}).get("p1")
    if nb.dt_nbr is None or cal.get("threshold") is None or floor is None:
        return found, {"note": "no fine-detail signal in use"}, none
    best, s1, gap = gaps(nb)
    got = fit(gap, train_rows)
    if isinstance(got, str):
        return found, {"note": got}, none
    ok = (best >= 0) & (np.nan_to_num(s1, nan=-1.0) >= float(floor)) & (
        np.nan_to_num(gap, nan=np.inf) <= got["gap"])
    have = {(a, b) for a, b, _, _ in found}
    extra: dict[tuple[int, int], float] = {}
    for r in np.flatnonzero(ok).tolist():
        a, b = int(nb.idx[r]), int(best[r])
        key = (min(a, b), max(a, b))
        if a != b and key not in have:
            extra[key] = max(extra.get(key, -1.0), float(s1[r]))
    merged = found + [(a, b, sim, "standout") for (a, b), sim in extra.items()]
    merged.sort(key=lambda p: (p[3] != "exact", -p[2]))
    counted = float(ok[train_rows].mean()) if train_rows.any() else 0.0
    return merged, {**got, "floor": round(float(floor), 5), "added": len(extra),
                    "counted_rate": round(counted, 5), "fitted_rate": TAIL,
                    "note": f"a fine-detail match of at least {floor:.3f} that stands out, "
                            f"under {got['ratio']:.2f} times as dissimilar as the sample's "
                            f"next candidate (by a fit to this data's samples, that happens "
                            f"0.1% of the time; typically {got['median_ratio']:.2f} times), "
                            f"counts as a copy too: {len(extra)} pair(s) added"}, ok
