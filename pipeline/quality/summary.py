"""Duplicates, leaks and outliers from the neighbour lists, and every part of the stage
combined into the report's ``quality`` section (with what ``quality.exclude`` leaves out).

- **Near duplicates:** two samples whose features' cosine similarity is at least the
  threshold (calibrated, or ``quality.near_duplicate_threshold``); **exact duplicates:** the
  same content digest (those the planner removed are listed too).
- **Leaks:** duplicate pairs (exact or near) across splits. The held-out member (test, else
  val) is the leaked sample: ``exclude: [leaks]`` evaluates without it.
- **Duplicates within a split:** groups of mutually near samples (connected components);
  ``exclude: [duplicates]`` keeps the lowest-index member of each group.
- **Outliers:** the mean cosine distance to a sample's nearest neighbours, as a robust
  z-score (median and MAD over the data set); above ``quality.outlier_z`` a sample is far from
  everything else: out of domain, corrupt, or a rare mode worth a look.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from math import erf, log, sqrt
from typing import Any

import numpy as np

from pipeline.quality.neighbors import Neighbors

HELD_OUT = {"test": 2, "val": 1, "train": 0}
# the near-copy signals (neighbors.tables)
SIGNALS = ("features", "signatures", "aligned", "detail")


def split_of(splits: dict[str, list[int]]) -> dict[int, str]:
    return {int(i): name for name, ids in splits.items() for i in ids}


Pair = tuple[int, int, float, str]  # a < b, similarity, how found: exact or a signal


def pairs(nb: Neighbors, thresholds: Mapping[str, float | None],
          digests: np.ndarray | None) -> list[Pair]:
    """Every unordered pair (a < b) with the same digest, or a similarity at or above the
    threshold of a signal (``SIGNALS``; None: not used), once
    each."""
    found: dict[tuple[int, int], tuple[float, str]] = {}
    for signal, (nbr, sim) in nb.tables().items():
        t = thresholds.get(signal)
        if t is None:
            continue
        rows, cols = np.nonzero(sim >= t)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            a, b = int(nb.idx[r]), int(nbr[r, c])
            if b < 0 or a == b:
                continue
            key = (min(a, b), max(a, b))
            if key not in found or (found[key][1] != "exact" and sim[r, c] > found[key][0]):
                found[key] = (float(sim[r, c]), signal)
    if digests is not None and len(nb.idx):
        rows = np.ascontiguousarray(digests[nb.idx])  # (n, bytes) uint8 -> one value per row
        d = rows.view(f"S{rows.shape[-1]}").ravel() if rows.ndim == 2 else rows
        order = np.argsort(d, kind="stable")
        ds, ids = d[order], nb.idx[order]
        for s in np.flatnonzero(ds[1:] == ds[:-1]):  # consecutive equal digests: chain them
            a, b = int(ids[s]), int(ids[s + 1])
            found[(min(a, b), max(a, b))] = (1.0, "exact")
    return [(a, b, sim, how) for (a, b), (sim, how) in
            sorted(found.items(), key=lambda kv: (kv[1][1] != "exact", -kv[1][0]))]


def confirm(found: list[Pair], nb: Neighbors, cal: Mapping[str, Any],
            score: Callable[[np.ndarray, np.ndarray], np.ndarray]
            ) -> tuple[list[Pair], dict[str, Any]]:
    """Near pairs kept only where their fine detail agrees (images, with the ``detail``
    signal calibrated and used: ``cal``): a pair found on the features or the thumbnails
    whose aligned fine detail is below what 99 % of the calibration copies reach is two
    distinct images that look alike at 16 x 16 (crops of one smooth photo or texture), not a
    copy. ``score(a, b)`` gives the detail of pairs the neighbour table has not scored.
    Returns the kept pairs and what the section says of it."""
    floor = (cal.get("copy_similarity") or {}).get("p1")
    if nb.dt_nbr is None or nb.dt_sim is None or cal.get("threshold") is None or floor is None:
        return found, {}
    known: dict[tuple[int, int], float] = {}
    for r, c in zip(*np.nonzero(nb.dt_nbr >= 0), strict=True):
        a, b = int(nb.idx[r]), int(nb.dt_nbr[r, c])
        known[(min(a, b), max(a, b))] = float(nb.dt_sim[r, c])
    need = [(a, b) for a, b, _, how in found if how not in ("exact", "detail")
            and (a, b) not in known]
    if need:
        got = score(np.asarray([a for a, _ in need]), np.asarray([b for _, b in need]))
        known.update(zip(need, (float(v) for v in got), strict=True))
    kept = [p for p in found if p[3] in ("exact", "detail") or known[(p[0], p[1])] >= floor]
    return kept, {"floor": round(float(floor), 5), "dropped": len(found) - len(kept),
                  "note": f"a pair found on the features or the thumbnails counts only where "
                          f"its fine detail reaches {floor:.3f} (what 99% of the calibration "
                          f"copies reach); {len(found) - len(kept)} did not: distinct images "
                          "alike at 16 x 16"}


def duplicates(found: list[Pair], where: dict[int, str], limit: int) -> dict[str, Any]:
    """Leaks (cross-split pairs) and within-split duplicate groups."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    cross = [p for p in found if where.get(p[0]) != where.get(p[1])]
    within = [p for p in found if where.get(p[0]) == where.get(p[1])]
    leaked: dict[int, dict[str, Any]] = {}
    for a, b, sim, how in cross:
        held, twin = (a, b) if HELD_OUT[where[a]] > HELD_OUT[where[b]] else (b, a)
        if held not in leaked or sim > leaked[held]["similarity"]:
            leaked[held] = {"index": held, "split": where[held], "twin": twin,
                            "twin_split": where[twin], "similarity": round(sim, 5),
                            "found_by": how}
    redundant: list[int] = []
    groups = 0
    if within:
        nodes = sorted({i for a, b, _, _ in within for i in (a, b)})
        pos = {n: k for k, n in enumerate(nodes)}
        m = coo_matrix((np.ones(len(within)), ([pos[a] for a, *_ in within],
                                               [pos[b] for _, b, *_ in within])),
                       shape=(len(nodes), len(nodes)))
        groups, comp = connected_components(m, directed=False)
        first: dict[int, int] = {}
        for n, c in zip(nodes, comp.tolist(), strict=True):
            if c in first:
                redundant.append(n)
            else:
                first[c] = n
    def row(p: Pair) -> dict[str, Any]:
        return {"a": p[0], "b": p[1], "split_a": where.get(p[0]), "split_b": where.get(p[1]),
                "similarity": round(p[2], 5), "found_by": p[3]}

    by = {how: sum(1 for p in found if p[3] == how) for how in ("exact", *SIGNALS, "standout")}
    return {"pairs": len(found), "cross_split_pairs": len(cross),
            "within_split_pairs": len(within), "within_split_groups": int(groups),
            "found_by": by,
            "leaked": sorted(leaked), "leaks": sorted(leaked.values(),
                                                      key=lambda r: -r["similarity"])[:limit],
            "redundant": sorted(redundant),
            "top_pairs": [row(p) for p in (cross + within)[:limit]],
            # the page's duplicates: the cross-split pairs are its leaks, listed once there
            "within_pairs": [row(p) for p in within[:limit]]}


def nearest_distinct(nb: Neighbors, where: dict[int, str], labels: np.ndarray,
                     digests: np.ndarray | None) -> dict[str, np.ndarray] | str:
    """Per signal, each training sample's similarity to its nearest *distinct* same-class
    training neighbour (other bytes; NaN where none is among its neighbours), or why it
    cannot be measured."""
    n = len(labels)
    split = np.full(n, -1, np.int8)
    for i, name in where.items():
        if 0 <= i < n:
            split[i] = HELD_OUT[name]
    rows = split[nb.idx] == HELD_OUT["train"]
    if rows.sum() < 10:
        return f"{int(rows.sum())} training samples are too few to measure it"
    key = None
    if digests is not None:
        d = np.ascontiguousarray(digests)
        key = d.view(f"V{d.shape[-1]}").ravel() if d.ndim == 2 else d
    idx = nb.idx[rows]
    out: dict[str, np.ndarray] = {}
    for signal, (nbr, sim) in nb.tables().items():
        nr, sr = nbr[rows], sim[rows]
        safe = np.clip(nr, 0, n - 1)
        ok = (nr >= 0) & (nr != idx[:, None]) & (split[safe] == HELD_OUT["train"]) & (
            labels[safe] == labels[idx][:, None])
        if key is not None:
            ok &= key[safe] != key[idx][:, None]
        best = sr[np.arange(len(idx)), ok.argmax(axis=1)].astype(np.float64)
        out[signal] = np.where(ok.any(axis=1), best, np.nan)
    return out


NATURAL_Z = 3.09  # one-sided 99.9 % of a normal


def robust_normal(x: np.ndarray) -> tuple[float, float]:
    """The normal fitted by median and MAD: (mean, sd); what sits in one tail (real copies)
    barely moves it."""
    mu = float(np.median(x))
    return mu, 1.4826 * float(np.median(np.abs(x - mu)))


def natural_fit(best: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per signal, the normal fitted by median and MAD to log(1 - s) of each training
    sample's nearest distinct same-class neighbour (:func:`nearest_distinct`): (mean, sd).
    The robust fit is the point: real near copies inside train sit in the upper tail,
    where they would set an empirical percentile; the median and MAD of the bulk barely
    move."""
    out = {}
    for signal, v in best.items():
        v = v[np.isfinite(v)]
        if len(v) < 20:
            continue
        out[signal] = robust_normal(np.log(np.clip(1.0 - v, 1e-6, None)))
    return out


def natural_likeness(best: dict[str, np.ndarray]) -> dict[str, float]:
    """Per signal, the similarity that distinct same-class samples reach 0.1 % of the time,
    by :func:`natural_fit`."""
    return {signal: round(1.0 - float(np.exp(mu - NATURAL_Z * sd)), 5)
            for signal, (mu, sd) in natural_fit(best).items()}


def fitted_rate(best: dict[str, np.ndarray],
                thresholds: Mapping[str, float | None]) -> float | None:
    """How often distinct same-class samples pass for copies by :func:`natural_fit`: the
    fitted share over each used signal's threshold, summed over the signals (a union
    bound). None where a signal cannot be fitted (too few pairs, or no spread)."""
    fit, total = natural_fit(best), 0.0
    for signal, t in thresholds.items():
        if t is None or signal not in best:
            continue
        if signal not in fit or fit[signal][1] <= 0:
            return None
        mu, sd = fit[signal]
        total += 0.5 * (1.0 + erf((log(max(1.0 - t, 1e-6)) - mu) / sd / sqrt(2.0)))
    return min(1.0, total)


def false_leak_rate(nb: Neighbors, thresholds: Mapping[str, float | None],
                    where: dict[int, str], labels: np.ndarray,
                    digests: np.ndarray | None,
                    best: dict[str, np.ndarray] | str | None = None,
                    standout: tuple[np.ndarray, float] | None = None) -> dict[str, Any]:
    """How often two *distinct* training samples of one class are as alike as a leak call
    needs: each training sample's nearest distinct same-class training neighbour (not the
    same bytes), over the near-copy threshold of any signal. Counted (``rate``), real near
    copies inside train count too: an upper bound on how often natural likeness passes for
    a copy; ``fitted_rate`` (:func:`fitted_rate`) is what the bulk of those pairs says,
    which real copies barely move. ``best``: :func:`nearest_distinct`'s answer when the
    caller already has it. ``standout``: which training samples' best fine-detail candidate
    stands out (:mod:`standout`; a mask in the order of ``nb.idx``'s training rows) and the
    rule's fitted rate, both added (a union bound)."""
    if best is None:
        best = nearest_distinct(nb, where, labels, digests)
    if isinstance(best, str):
        return {"note": best}
    seen = np.zeros(len(next(iter(best.values()))) if best else 0, bool)
    over = np.zeros_like(seen)
    for signal, v in best.items():
        t = thresholds.get(signal)
        if t is None:
            continue
        seen |= np.isfinite(v)
        over |= np.isfinite(v) & (np.nan_to_num(v, nan=-np.inf) >= t)
    if standout is not None:
        over |= standout[0]
        seen |= standout[0]
    if not seen.any():
        return {"note": "no distinct same-class training pairs among the neighbours"}
    fitted = fitted_rate(best, thresholds)
    if fitted is not None and standout is not None:
        fitted = min(1.0, fitted + standout[1])
    return {"rate": round(float(over[seen].mean()), 5), "pairs": int(seen.sum()),
            **({} if fitted is None else {"fitted_rate": round(fitted, 5)})}


def qualify_leaks(section: dict[str, Any], held_out: int) -> None:
    """Say how sure the leak call is: copies with the same bytes are certain; near copies are
    confident only when natural likeness (``false_leak``) explains at most a fifth of them."""
    dup = section.get("duplicates", {})
    fl = dup.get("false_leak") or {}
    counted, fitted = fl.get("rate"), fl.get("fitted_rate")
    rate = fitted if fitted is not None else counted
    near = sum(1 for r in dup.get("leaks", []) if r["found_by"] != "exact")
    exact = len(dup.get("leaked", [])) - near
    if rate is None or near == 0:
        dup["leak_call"] = {"confident": True, "exact": exact, "near": near}
        return
    expected = rate * held_out
    confident = expected <= 0.2 * near
    how = ("" if fitted is None else
           f" (fitted to the bulk of their nearest-neighbour similarities; counted, "
           f"{counted:.1%}, which includes any real copies inside train)")
    dup["leak_call"] = {
        "confident": confident, "exact": exact, "near": near,
        "expected_false": round(expected, 1),
        "note": (f"distinct same-class training samples are this alike {rate:.1%} of the "
                 f"time{how}: about {expected:.1f} of the {near} near-copy leak(s) among "
                 f"{held_out} held-out samples could be natural likeness")
        + ("" if confident else "; the leak call is not confident (test top-1 without "
           "them is not shown)")}


def outliers(nb: Neighbors, z_max: float, where: dict[int, str], labels: np.ndarray,
             limit: int) -> dict[str, Any]:
    if len(nb.idx) < 10:
        return {"note": f"{len(nb.idx)} samples are too few to call any of them an outlier"}
    sim = np.where(np.isfinite(nb.sim), nb.sim, np.nan)
    dist = 1.0 - np.nanmean(sim, axis=1)
    med = float(np.nanmedian(dist))
    mad = float(np.nanmedian(np.abs(dist - med))) * 1.4826
    z = (dist - med) / max(mad, 1e-6)
    flagged = np.flatnonzero(z > z_max)
    flagged = flagged[np.argsort(-z[flagged])]
    return {"count": len(flagged), "checked": len(nb.idx), "z_threshold": z_max,
            "neighbours": int(nb.sim.shape[1]), "median_distance": round(med, 5),
            "all": [int(nb.idx[i]) for i in flagged],
            "items": [{"index": int(nb.idx[i]), "split": where.get(int(nb.idx[i])),
                       "label": int(labels[nb.idx[i]]), "distance": round(float(dist[i]), 5),
                       "z": round(float(z[i]), 2)} for i in flagged[:limit]]}


SCORES = {"label_issue": "probability that the given label is wrong (the fitted noise model)",
          "leak": "cosine similarity to its twin in another split (1.0: same bytes)",
          "duplicate": "cosine similarity to its kept twin in the same split (1.0: same bytes)",
          "outlier": "robust z-score of the distance to its nearest neighbours"}


def flagged(section: dict[str, Any], found: list[Pair],
            where: dict[int, str]) -> list[dict[str, Any]]:
    """Every flagged sample, one row per finding (a sample may have several): what was
    found, its score (``SCORES`` says what each means), the suggested label or the twin.
    Label issues withheld as noise (a weak probe) are left out, as in the summary."""
    rows: list[dict[str, Any]] = []
    li = section.get("label_issues", {})
    if not li.get("withheld"):
        rows += [{"index": r["index"], "finding": "label_issue",
                  "score": r["confidence"], "given": r["given"],
                  "suggested": r["suggested"], "twin": None} for r in li.get("issues", [])]
    dup = section.get("duplicates", {})
    rows += [{"index": r["index"], "finding": "leak", "score": r["similarity"],
              "given": None, "suggested": None, "twin": r["twin"]}
             for r in dup.get("leaks", [])]
    best: dict[int, tuple[float, int]] = {}
    for a, b, sim, _ in found:
        if where.get(a) == where.get(b):
            for i, j in ((a, b), (b, a)):
                if i not in best or sim > best[i][0]:
                    best[i] = (sim, j)
    rows += [{"index": i, "finding": "duplicate", "score": round(best[i][0], 5),
              "given": None, "suggested": None, "twin": best[i][1]}
             for i in dup.get("redundant", []) if i in best]
    rows += [{"index": r["index"], "finding": "outlier", "score": r["z"], "given": None,
              "suggested": None, "twin": None} for r in section.get("outliers", {}).get(
                  "items", [])]
    return rows


def shorten(section: dict[str, Any], limit: int) -> None:
    """The lists the page shows, cut to ``limit`` (``flagged`` and the ``all`` lists keep
    everything)."""
    for key, field in (("label_issues", "issues"), ("duplicates", "leaks"),
                       ("duplicates", "top_pairs"), ("duplicates", "within_pairs"),
                       ("outliers", "items")):
        part = section.get(key, {})
        if isinstance(part.get(field), list):
            part[field] = part[field][:limit]


def excluded(section: dict[str, Any], categories: tuple[str, ...]) -> dict[str, list[int]]:
    """Sample indices ``quality.exclude`` leaves out, by category."""
    picks = {"leaks": section.get("duplicates", {}).get("leaked", []),
             "duplicates": section.get("duplicates", {}).get("redundant", []),
             "label_issues": section.get("label_issues", {}).get("all", []),
             "outliers": section.get("outliers", {}).get("all", [])}
    return {c: sorted(int(i) for i in picks[c]) for c in categories}


LABEL_SIGNAL_MIN = 0.7  # out-of-fold top-1 below which label flags are mostly probe errors
STRONG_TOP1 = 0.9  # measured accuracy that makes "frozen features will underperform" false


def qualify(section: dict[str, Any], weights_id: str,
            pretraining: dict[str, Any] | None = None) -> None:
    """Make every finding say how sure it is and agree with what the job measured: label
    flags are withheld when the probe is too weak for them to mean anything; the advice about
    the pretraining domain reads the accuracy measured on this data, and an encoder pretrained
    on this very data (``job:<id>``) is recognised, never told to pretrain, and its pretraining
    report's "did it help?" (``pretraining``) is quoted."""
    li = section.get("label_issues", {})
    if "oof_top1" in li and li["oof_top1"] < LABEL_SIGNAL_MIN:
        li["withheld"] = True
        li["note"] = (f"out-of-fold top-1 is {li['oof_top1']:.3f}, below "
                      f"{LABEL_SIGNAL_MIN:g}: most of the {li['count']} flags would be the "
                      "probe's own mistakes, not wrong labels; not counted in the summary "
                      "(a stronger backbone makes this check meaningful)")
    measured = li.get("oof_top1")
    points = section.get("learning_curve", {}).get("points") or []
    if points:
        measured = max(measured or 0.0, float(points[-1]["val_top1"]))
    dom = section.get("pretraining_domain", {})
    if weights_id.startswith("job:"):
        dom["domain"] = "own"
        dom["advice"] = (f"the encoder ({weights_id}) was pretrained on your own images: "
                         "the distance from a public pretraining set does not apply" + (
                             f"; did its pretraining help? {pretraining['summary']}"
                             if pretraining else ""))
    elif dom.get("domain") == "far" and measured is not None and measured >= STRONG_TOP1:
        dom["advice"] = (f"the images look unlike the backbone's pretraining data, yet frozen "
                         f"features already reach {measured:.3f} top-1 here: fine-tuning may "
                         "still add a little (featurefleet compare --strategies "
                         "probe,finetune)")
    elif dom.get("domain") == "near" and measured is not None and measured < 0.5:
        dom["advice"] = (f"the images look like the backbone's pretraining data, but frozen "
                         f"features reach only {measured:.3f} top-1: the labels may not follow "
                         "what the backbone sees; check the label issues, or fine-tune")
