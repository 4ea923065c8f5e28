"""Label issues: confident learning (Northcutt et al. 2021, the ``cleanlab`` library) on
out-of-fold predictions of the linear probe.

Every labeled sample (train, val and test: a wrong test label distorts the evaluation too) is
assigned to one of ``folds`` stratified folds; one task per fold fits the probe on the other
folds and predicts its own. A sample is flagged when the confident joint says its given label
is unlikely given what the other folds learned; flags are ranked by the probability of the
given label (lowest first) and carry the suggested label (the most probable one).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.heads import linear


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
    head = linear.fit_probe(x[train], y[train], n_classes, l2=l2, max_iter=max_iter)
    return head.predict_proba(x[fold == which]).astype(np.float32)


def label_issues(labels: np.ndarray, proba: np.ndarray, idx: np.ndarray,
                 limit: int) -> dict[str, Any]:
    """Samples whose given label the out-of-fold predictions confidently contradict."""
    from cleanlab.filter import find_label_issues

    present = np.unique(labels)
    if len(present) < 2:
        return {"note": "a single class: label issues need at least two"}
    # cleanlab wants the classes present as 0..K'-1 (absent classes would be empty columns)
    remap = np.full(proba.shape[1], -1, np.int64)
    remap[present] = np.arange(len(present))
    p = proba[:, present]
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    # n_jobs=1: a Celery prefork child is daemonic and may not start processes
    ranked = find_label_issues(remap[labels], p, return_indices_ranked_by="self_confidence",
                               n_jobs=1)
    given_p = proba[np.arange(len(labels)), labels]
    suggested = present[p.argmax(axis=1)]
    flagged = [{"index": int(idx[i]), "given": int(labels[i]),
                "suggested": int(suggested[i]), "given_probability": round(float(given_p[i]), 4),
                "suggested_probability": round(float(proba[i, suggested[i]]), 4)}
               for i in ranked]
    return {"count": len(flagged), "checked": len(labels), "issues": flagged[:limit],
            "all": [f["index"] for f in flagged],
            "oof_top1": round(float((proba.argmax(axis=1) == labels).mean()), 5)}
