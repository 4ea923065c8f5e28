"""Label issues: a noise model fitted to out-of-fold predictions of the linear probe, with
confident learning (Northcutt et al. 2021, the ``cleanlab`` library) as a second opinion.

Every labeled sample (train, val and test: a wrong test label distorts the evaluation too) is
assigned to one of ``folds`` stratified folds; one task per fold fits the probe on the other
folds and predicts its own. Those predictions and the labels of each sample's nearest
neighbours (by the features, by the image signatures) are combined with weights fitted to
the given labels (:func:`evidence`). A noise model fitted to them (:func:`noise_model`)
gives every sample the probability that its label was flipped; a label is flagged when that
is at least ``FLAG_POSTERIOR``. Flags are ranked by it (surest first), carry the suggested
label (the most probable one), that confidence and whether cleanlab's confident learning
flags the sample too; the flagged set's expected precision is their mean confidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.heads import linear
from pipeline.quality.neighbors import Neighbors

FLAG_POSTERIOR = 0.5  # a candidate is flagged when its label is more likely flipped than not
FOLD_ITERS = 100  # L-BFGS iterations of an out-of-fold probe (measured: digits converge by 50)
# ...or fewer: an out-of-fold probe stops once its loss changes by less than this (the job's
# own probe by 1e-9). Measured on digits with 60 flipped labels (docs/quality.md, round
# 24-8): the same 57 flags from 39 function evaluations a fold instead of 95, 0.8 s vs 1.8 s
FOLD_TOLERANCE = 1e-6  # (the learning curve's probes too: its val top-1 moved by <= 3 of 350)


def fold_of(labels: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, str | None]:
    """Stratified fold number of every sample (-1 for members of classes too small to be
    cross-validated), and a note when some are left out or there are fewer folds."""
    fold = np.full(len(labels), -1, np.int64)
    rng = np.random.default_rng(seed)
    small = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            small.append(int(c))
            continue
        members = rng.permutation(members)
        fold[members] = np.arange(len(members)) % folds
    note = (f"{len(small)} class(es) with a single labeled sample cannot be cross-validated; "
            "their samples are not checked") if small else None
    return fold, note


def out_of_fold(x: np.ndarray, y: np.ndarray, fold: np.ndarray, which: int, n_classes: int,
                l2: float, max_iter: int) -> np.ndarray:
    """Probabilities for the rows of fold ``which`` from a probe fitted on the other folds."""
    train = (fold != which) & (fold >= 0)
    head = linear.fit_probe(x[train], y[train], n_classes, l2=l2, max_iter=max_iter,
                            tolerance=FOLD_TOLERANCE)
    return head.predict_proba(x[fold == which]).astype(np.float32)


def noise_model(labels: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """How likely each given label is to be wrong, from a model fitted to the data.

    A label is either right (drawn from the class the features show) or flipped to one of
    the other ``K - 1`` classes at random, with a noise rate ``pi``; the out-of-fold
    probabilities, sharpened or softened by a temperature ``T``, say which class the
    features show. ``T`` and ``pi`` are the maximum-likelihood fit (a grid) to the given
    labels, so a probe that is confidently wrong about ambiguous samples gets a higher
    temperature rather than a noise rate, and a sample's ``posterior`` (the probability that
    its label was flipped) is Bayes' rule under that fit. What the flagged set's expected
    precision then means is stated plainly: the share of flags that are flips *if* labels
    go wrong the way the model assumes (at random); confusions between look-alike classes
    are read as ambiguity, not noise.
    """
    k = proba.shape[1]
    logp = np.log(np.clip(proba.astype(np.float64), 1e-12, 1.0))
    best: tuple[float, float, float, np.ndarray] | None = None
    for t in np.geomspace(0.25, 8.0, 21):
        z = logp / t
        z -= z.max(axis=1, keepdims=True)
        q = np.exp(z)
        q /= q.sum(axis=1, keepdims=True)
        qy = q[np.arange(len(labels)), labels]
        for pi in np.concatenate([[0.0], np.geomspace(1e-4, 0.5, 60)]):
            ll = float(np.log((1 - pi) * qy + pi * (1 - qy) / max(k - 1, 1) + 1e-300).sum())
            if best is None or ll > best[0]:
                best = (ll, float(t), float(pi), qy)
    assert best is not None
    _, t, pi, qy = best
    flip = pi * (1 - qy) / max(k - 1, 1)
    posterior = flip / np.maximum(flip + (1 - pi) * qy, 1e-300)
    return {"temperature": round(t, 3), "noise_rate": round(pi, 5),
            "posterior": posterior.astype(np.float32)}


KNN_SMOOTHING = 0.1  # share of a neighbour vote spread evenly over the classes


def vote(idx: np.ndarray, labels: np.ndarray, nbr_idx: np.ndarray,
         nbr: np.ndarray, k: int) -> np.ndarray:
    """What each labeled sample's nearest neighbours are labeled (``nbr``: the neighbours of
    ``nbr_idx``; unlabeled ones and -1 vote for nothing): the share of each class among
    them, ``KNN_SMOOTHING`` of it spread evenly over the ``k`` classes (no vote: uniform)."""
    top = int(max(idx.max(initial=0), nbr_idx.max(initial=0), nbr.max(initial=0))) + 2
    label_of = np.full(top, -1, np.int64)  # by sample index; the last slot: no neighbour
    label_of[idx] = labels
    row_of = np.full(top, -1, np.int64)
    row_of[nbr_idx] = np.arange(len(nbr_idx))
    rows = row_of[idx]
    found = label_of[np.where(nbr[np.maximum(rows, 0)] >= 0, nbr[np.maximum(rows, 0)], -1)]
    found[rows < 0] = -1  # a sample without a neighbour list votes for nothing
    votes = np.zeros((len(idx), k), np.float64)
    r, c = np.nonzero(found >= 0)
    np.add.at(votes, (r, found[r, c]), 1.0)
    counts = votes.sum(axis=1, keepdims=True)
    votes = np.where(counts > 0, votes / np.maximum(counts, 1), 1.0 / k)
    out: np.ndarray = (1 - KNN_SMOOTHING) * votes + KNN_SMOOTHING / k
    return out


def combine(views: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The views' probabilities combined as a weighted geometric mean, normalized."""
    z = sum(float(w) * np.log(np.clip(v.astype(np.float64), 1e-12, 1.0))
            for w, v in zip(weights, views, strict=True))
    z = np.asarray(z) - np.max(z, axis=1, keepdims=True)
    q = np.exp(z)
    out: np.ndarray = (q / q.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


MAX_WEIGHT = 4.0


def fit_weights(views: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """The weights (each in [0, ``MAX_WEIGHT``]) under which :func:`combine` makes the given
    labels most likely: a view that does not predict them (e.g. signatures of textures)
    gets about none; their sum also sets how sharp the combination is. A number a view,
    fitted on every labeled sample: the noisy few barely move them."""
    from scipy.optimize import minimize

    logs = [np.log(np.clip(v.astype(np.float64), 1e-12, 1.0)) for v in views]
    rows = np.arange(len(labels))

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = sum(wi * lv for wi, lv in zip(w, logs, strict=True))
        z = np.asarray(z) - np.max(z, axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        q = np.exp(z - lse[:, None])
        grad = np.array([-(lv[rows, labels] - (q * lv).sum(axis=1)).sum() for lv in logs])
        return float(-(z[rows, labels] - lse).sum()), grad

    got = minimize(nll, np.full(len(views), 1.0 / len(views)), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, MAX_WEIGHT)] * len(views))
    return np.asarray(got.x, np.float64)


def evidence(proba: np.ndarray, idx: np.ndarray, labels: np.ndarray, nbr_idx: np.ndarray,
             tables: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
    """The probe's out-of-fold probabilities and the neighbour vote of each table (e.g.
    ``{"feature neighbours": nbr, "signature neighbours": sig_nbr}``, rows aligned with
    ``nbr_idx``) combined by :func:`combine` with :func:`fit_weights`; and, per view, its
    weight and how often it alone names the given label."""
    k = proba.shape[1]
    views = {"probe": proba.astype(np.float64)}
    views |= {name: vote(idx, labels, nbr_idx, t, k) for name, t in tables.items()}
    w = fit_weights(list(views.values()), labels)
    return combine(list(views.values()), w), {
        name: {"weight": round(float(wi), 3),
               "top1": round(float((v.argmax(axis=1) == labels).mean()), 4)}
        for (name, v), wi in zip(views.items(), w, strict=True)}


def label_issues(labels: np.ndarray, proba: np.ndarray, idx: np.ndarray, limit: int,
                 evidence: np.ndarray | None = None) -> dict[str, Any]:
    """Samples whose given label the out-of-fold predictions (``proba``; judged by
    ``evidence`` when given, e.g. :func:`combine` of the probe and neighbour votes)
    confidently contradict."""
    from cleanlab.filter import find_label_issues

    top1 = round(float((proba.argmax(axis=1) == labels).mean()), 5)  # the probe's own
    proba = proba if evidence is None else evidence
    present = np.unique(labels)
    if len(present) < 2:
        return {"note": "a single class: label issues need at least two"}
    # cleanlab wants the classes present as 0..K'-1 (absent classes would be empty columns)
    remap = np.full(proba.shape[1], -1, np.int64)
    remap[present] = np.arange(len(present))
    p = proba[:, present]
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    model = noise_model(remap[labels], p)
    post = model["posterior"]
    given_p = proba[np.arange(len(labels)), labels]
    suggested = present[p.argmax(axis=1)]
    # the noise model decides: every label more likely flipped than not, surest first.
    # Confident learning (cleanlab) is its second opinion, shown with each flag: its
    # noise-rate pruning drops flips the model is sure of (planted digits at 224 px: 11 of 54 flips
    # missed when it had to agree, 4 without)
    # n_jobs=1: a Celery prefork child is daemonic and may not start processes
    second = set(find_label_issues(remap[labels], p, n_jobs=1).nonzero()[0].tolist())
    kept = [int(i) for i in np.argsort(-post, kind="stable") if post[i] >= FLAG_POSTERIOR]
    flagged = [{"index": int(idx[i]), "given": int(labels[i]),
                "suggested": int(suggested[i]), "given_probability": round(float(given_p[i]), 4),
                "suggested_probability": round(float(proba[i, suggested[i]]), 4),
                "confidence": round(float(post[i]), 4),
                "confident_learning": i in second}
               for i in kept]
    expected = float(post.sum())
    out: dict[str, Any] = {
        "count": len(flagged), "checked": len(labels), "issues": flagged[:limit],
        "all": [f["index"] for f in flagged], "confident_learning": {
            "found": len(second), "agrees": sum(f["confident_learning"] for f in flagged)},
        "oof_top1": top1,
        "noise_model": {"temperature": model["temperature"],
                        "noise_rate": model["noise_rate"],
                        "expected_wrong_labels": round(expected, 1)}}
    if flagged:
        out["expected_precision"] = round(float(post[kept].mean()), 3)
        out["expected_recall"] = round(float(post[kept].sum()) / max(expected, 1e-12), 3)
    return out


def from_folds(paths: list[Path], nb: Neighbors, limit: int) -> dict[str, Any]:
    """:func:`label_issues` of the out-of-fold predictions the ``fold.<f>`` parts wrote
    (``paths``: their files, npz of ``idx``, ``y``, ``proba``), judged by :func:`evidence`
    with the neighbour tables of ``nb``; or why there are none."""
    idx, y, proba = [], [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            if len(z["proba"]):
                idx.append(z["idx"])
                y.append(z["y"])
                proba.append(z["proba"])
    if not idx:
        return {"note": "no out-of-fold predictions: the data has fewer than two classes "
                        "with two labeled samples each"}
    idx_a, y_a, p_a = np.concatenate(idx), np.concatenate(y), np.concatenate(proba)
    if min(np.bincount(y_a)[np.unique(y_a)]) < 2 or len(y_a) < 10:
        return {"note": f"{len(y_a)} labeled samples are too few for out-of-fold predictions"}
    tables = {"feature neighbours": nb.nbr}
    if nb.sig_nbr is not None:
        tables["signature neighbours"] = nb.sig_nbr
    combined, views = evidence(p_a, idx_a, y_a, nb.idx, tables)
    return {**label_issues(y_a, p_a, idx_a, limit, evidence=combined), "evidence": views}
