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
          fraction: float, seed: int, l2: float, max_iter: int,
          tolerance: float = 1e-9) -> dict[str, Any]:
    rows = subset(y, fraction, seed)
    whole = len(rows) == len(y)  # the full training set: no copy of it
    head = linear.fit_probe(x if whole else x[rows], y if whole else y[rows], n_classes,
                            l2=l2, max_iter=max_iter, tolerance=tolerance)
    top1 = float((head.predict_proba(xv).argmax(axis=1) == yv).mean())
    return {"fraction": fraction, "samples": len(rows),
            "per_class": round(len(rows) / max(1, len(np.unique(y))), 2),
            "val_top1": round(top1, 5)}


def _law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return np.asarray(c - a * np.power(n, -b))


MAX_EXTRAPOLATION = 4.0  # labels per class are never predicted beyond 4x the largest measured


def merged(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve's points, one per training-set size (fractions that round to the same
    samples, e.g. 1 per class, are one point, not several), by size."""
    by_size: dict[float, dict[str, Any]] = {}
    for p in sorted(points, key=lambda q: q.get("fraction", q["per_class"])):
        by_size.setdefault(float(p.get("samples", p["per_class"])), p)
    return [by_size[k] for k in sorted(by_size)]


def fit(points: Sequence[dict[str, Any]], targets: Sequence[float],
        val_samples: int = 0) -> dict[str, Any]:
    """The fitted power law and its answers (a note instead when it cannot be fitted).

    The answers stay within what was measured: labels per class for a target already reached
    on the curve is the smallest measured size that reached it; a fitted answer beyond
    :data:`MAX_EXTRAPOLATION` times the largest size is withheld ("not reached within the
    measured range"); "more data pays off" needs the last measured gain to exceed the noise of
    the validation estimate (two standard errors over ``val_samples``)."""
    from scipy.optimize import curve_fit

    pts = merged(points)
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
    reasons: dict[str, str] = {}
    for t in targets:
        reached = [float(p["per_class"]) for p in pts if p["val_top1"] >= t]
        short_of = [float(p["per_class"]) for p in pts if p["val_top1"] < t]
        if reached:  # within the measured range: never below a size that fell short of it,
            hi = math.ceil(min(reached))  # never above the smallest that reached it
            lo = math.floor(max([s for s in short_of if s < min(reached)], default=0)) + 1
            want = math.ceil((a / (c - t)) ** (1 / b)) if t < c else hi
            needed[f"{t:g}"] = int(min(hi, max(lo, want)))
            reasons[f"{t:g}"] = "measured"
        elif t >= c:
            needed[f"{t:g}"] = None  # above the plateau: more labels alone will not reach it
            reasons[f"{t:g}"] = "above the fitted plateau"
        else:
            want = math.ceil((a / (c - t)) ** (1 / b))
            if want > MAX_EXTRAPOLATION * full:
                needed[f"{t:g}"] = None
                reasons[f"{t:g}"] = (f"not reached within the measured range (the fit says "
                                     f"~{want}, over {MAX_EXTRAPOLATION:g}x the "
                                     f"{full:g} measured): collect more, then measure again")
            else:
                needed[f"{t:g}"] = want
                reasons[f"{t:g}"] = "fitted"
    last_gain = float(acc[-1] - acc[-2])
    p_hat = float(np.clip(acc[-1], 1e-3, 1 - 1e-3))
    noise = 2 * math.sqrt(p_hat * (1 - p_hat) / val_samples) if val_samples else 0.0
    saturated = acc[-1] >= 0.999
    paying = gain >= 0.005 and last_gain > noise and not saturated
    if paying:
        advice = (f"more labeled data is still paying off: the last doubling-or-so added "
                  f"{last_gain * 100:.1f} points (noise ±{noise * 100:.1f}); doubling again "
                  f"should add ~{gain * 100:.1f}")
    elif saturated:
        advice = ("validation top-1 is already at the ceiling: more labels cannot show a "
                  "gain here (a larger validation split could)")
    elif last_gain <= noise:
        advice = (f"no measurable gain from the last step of the curve "
                  f"({last_gain * 100:+.1f} points, noise ±{noise * 100:.1f} on "
                  f"{val_samples} validation samples): better features (fine-tuning, another "
                  "backbone) or cleaner labels should help more than more labels")
    else:
        advice = (f"the curve has flattened (doubling the data adds ~{gain * 100:.2f} "
                  "points): better features (fine-tuning, another backbone) or cleaner labels "
                  "will help more than more labels")
    return {"a": round(float(a), 5), "b": round(float(b), 5), "plateau": round(float(c), 5),
            "per_class_now": round(float(full), 1),
            "gain_if_doubled": round(gain, 5), "last_gain": round(last_gain, 5),
            "noise": round(noise, 5), "more_data_pays_off": paying,
            "per_class_needed": needed, "per_class_needed_how": reasons, "advice": advice}
