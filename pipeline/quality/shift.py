"""Distribution: does the test set look like the training set, and are the classes balanced?

Shift is measured with a domain classifier: a linear probe trained (out of fold) to tell
training features from test features. Its ROC AUC is 0.5 when the two are indistinguishable
and 1.0 when every test sample can be told apart; it is computed overall and within each
class (a shift confined to some classes shows there). At most ``max_rows`` samples per side
(seeded) are used: the AUC of a linear classifier is stable long before that.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.heads import linear

ITERS = 60  # L-BFGS iterations per fold: a ranking (AUC), not a converged model, is needed
MILD, STRONG = 0.6, 0.75  # AUC above which the shift is reported as mild / strong


def _verdict(auc: float) -> str:
    return "strong" if auc >= STRONG else "mild" if auc >= MILD else "none"


def domain_auc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               y_test: np.ndarray, seed: int, folds: int = 5, l2: float = 1e-2,
               max_rows: int = 20000) -> dict[str, Any]:
    """Train-vs-test domain classifier AUC, overall and per class."""
    from sklearn.metrics import roc_auc_score

    if len(y_train) < folds or len(y_test) < folds:
        return {"note": f"{len(y_train)} training and {len(y_test)} test samples are too few "
                        "for a domain classifier"}
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(y_train))[:max_rows]
    te = rng.permutation(len(y_test))[:max_rows]
    x = np.concatenate([x_train[tr], x_test[te]]).astype(np.float32)
    cls = np.concatenate([y_train[tr], y_test[te]])
    side = np.concatenate([np.zeros(len(tr), np.int64), np.ones(len(te), np.int64)])
    fold = np.empty(len(side), np.int64)
    for s in (0, 1):
        members = rng.permutation(np.flatnonzero(side == s))
        fold[members] = np.arange(len(members)) % folds
    score = np.empty(len(side), np.float32)
    for f in range(folds):
        head = linear.fit_probe(x[fold != f], side[fold != f], 2, l2=l2, max_iter=ITERS)
        score[fold == f] = head.predict_proba(x[fold == f])[:, 1]
    auc = float(roc_auc_score(side, score))
    per_class = {}
    for c in np.unique(cls):
        m = cls == c
        if min((side[m] == 0).sum(), (side[m] == 1).sum()) >= 5:
            per_class[int(c)] = round(float(roc_auc_score(side[m], score[m])), 4)
    worst = sorted(per_class.items(), key=lambda kv: -kv[1])
    return {"auc": round(auc, 4), "shift": _verdict(auc), "per_class_auc": per_class,
            "most_shifted": [c for c, a in worst[:5] if a >= MILD],
            "samples": {"train": len(tr), "test": len(te)},
            "advice": {"none": "train and test look alike to a linear classifier",
                       "mild": "a linear classifier can partly tell test from train: check "
                               "how the test data was collected",
                       "strong": "the test set comes from a visibly different distribution "
                                 "than training: test accuracy will not transfer to data like "
                                 "the training set, and vice versa"}[_verdict(auc)]}


def balance(labels_by_split: dict[str, np.ndarray], n_classes: int) -> dict[str, Any]:
    """Samples per class in each split; the largest/smallest class ratio of training."""
    counts = {name: np.bincount(y[y >= 0], minlength=n_classes).tolist()
              for name, y in labels_by_split.items()}
    train = np.asarray(counts.get("train", [0]))
    present = train[train > 0]
    ratio = float(present.max() / present.min()) if len(present) else 0.0
    missing = [int(c) for c in np.flatnonzero(train == 0)]
    out: dict[str, Any] = {"counts": counts, "imbalance_ratio": round(ratio, 2),
                           "classes_without_training_samples": missing}
    if ratio >= 10:
        out["advice"] = (f"the largest training class has {ratio:.0f}x the samples of the "
                         "smallest: read balanced accuracy and per-class recall, not top-1; "
                         "collect more of the small classes or reweight")
    return out
