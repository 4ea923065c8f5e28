"""Quantity: the learning curve, and what it says about more labels.

Each point is the linear probe fitted on a stratified, seeded fraction of the training set
(at least one sample per class) and scored on the validation split; the fractions nest (a
smaller subset is part of every larger one), so the curve is not noisier than the data. A
power law ``top1(n) = c − a·n^(−b)`` (``n``: labeled samples per class) is fitted to it;
from it: labels per class to reach each target accuracy (if below the plateau ``c``) and the
gain expected from doubling the training set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.heads import linear


def subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions of a stratified ``fraction`` of the rows, at least one per class; nested:
    the same seed gives each smaller fraction's rows inside every larger one's."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        keep.append(members[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def point(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, n_classes: int,
          fraction: float, seed: int, l2: float, max_iter: int) -> dict[str, Any]:
    rows = subset(y, fraction, seed)
    whole = len(rows) == len(y)  # the full training set: no copy of it
    head = linear.fit_probe(x if whole else x[rows], y if whole else y[rows], n_classes,
                            l2=l2, max_iter=max_iter)
    top1 = float((head.predict_proba(xv).argmax(axis=1) == yv).mean())
    return {"fraction": fraction, "samples": len(rows),
            "per_class": round(len(rows) / max(1, len(np.unique(y))), 2),
            "val_top1": round(top1, 5)}


def _law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return np.asarray(c - a * np.power(n, -b))


def fit(points: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """The fitted power law and its answers (a note instead when it cannot be fitted)."""
    from scipy.optimize import curve_fit

    pts = sorted(points, key=lambda p: p["per_class"])
    n = np.array([p["per_class"] for p in pts], float)
    acc = np.array([p["val_top1"] for p in pts], float)
    if len(np.unique(n)) < 3:
        return {"note": f"{len(np.unique(n))} distinct training-set sizes: a curve needs at "
                        "least 3 (the training set is too small for a learning curve)"}
    try:
        (a, b, c), _ = curve_fit(_law, n, acc, p0=(max(1e-3, acc[-1] - acc[0]), 0.5,
                                                   min(1.0, acc[-1] + 0.01)),
                                 bounds=([0, 0.01, 0], [10, 3, 1]), maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        return {"note": f"the power law could not be fitted ({exc})"}
    full = n[-1]
    gain = float(_law(np.array([2 * full]), a, b, c)[0] - _law(np.array([full]), a, b, c)[0])
    needed: dict[str, Any] = {}
    for t in targets:
        if t >= c:
            needed[f"{t:g}"] = None  # above the plateau: more labels alone will not reach it
        else:
            needed[f"{t:g}"] = math.ceil((a / (c - t)) ** (1 / b))
    paying = gain >= 0.005
    return {"a": round(float(a), 5), "b": round(float(b), 5), "plateau": round(float(c), 5),
            "per_class_now": round(float(full), 1),
            "gain_if_doubled": round(gain, 5), "more_data_pays_off": paying,
            "per_class_needed": needed,
            "advice": ("more labeled data is still paying off: doubling it should add "
                       f"{gain * 100:.1f} points of top-1") if paying else
                      ("the curve has flattened (doubling the data adds "
                       f"{gain * 100:.2f} points): better features (fine-tuning, another "
                       "backbone) or cleaner labels will help more than more labels")}
