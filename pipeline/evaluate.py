"""Classification metrics from predicted probabilities: plain numpy, checked against sklearn."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def classification_metrics(labels: np.ndarray, proba: np.ndarray,
                           class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5, balanced accuracy, per-class precision/recall/F1, confusion matrix,
    expected calibration error (15 bins) and log loss."""
    y = np.asarray(labels, dtype=np.int64)
    k = len(class_names)
    pred = proba.argmax(axis=1)
    n = len(y)
    # counts per (true, predicted) pair that occurs: bounded by the samples, never k x k
    pairs, counts = np.unique(np.stack([y, pred]), axis=1, return_counts=True) \
        if n else (np.zeros((2, 0), np.int64), np.zeros(0, np.int64))
    tp = np.bincount(y[pred == y], minlength=k).astype(float)
    support = np.bincount(y, minlength=k)
    predicted = np.bincount(pred, minlength=k)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=(precision + recall) > 0)
    top5 = np.argpartition(-proba, 4, axis=1)[:, :5] if k > 5 else np.argsort(-proba, axis=1)
    present = support > 0
    conf_pred = proba.max(axis=1)
    correct = pred == y
    edges = np.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf_pred > lo) & (conf_pred <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf_pred[m].mean())
    p_true = np.clip(proba[np.arange(n), y], 1e-15, 1.0) if n else np.ones(0)
    return {
        "samples": int(n),
        "top1": float(correct.mean()) if n else 0.0,
        "top5": float((top5 == y[:, None]).any(axis=1).mean()) if n else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "ece": float(ece),
        "log_loss": float(-np.log(p_true).mean()) if n else 0.0,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        **confusion(pairs, counts, class_names),
    }


MAX_DENSE_CLASSES = 50  # above this the report keeps the most frequent confusions only
TOP_CONFUSIONS = 50


def confusion(pairs: np.ndarray, counts: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """The confusion matrix (``confusion_matrix``, rows true, columns predicted) up to
    :data:`MAX_DENSE_CLASSES` classes, and always ``confusion_top``: the most frequent
    confusions (true, predicted, count), so a report stays small at any class count."""
    k = len(class_names)
    off = pairs[0] != pairs[1]
    order = np.argsort(-counts[off], kind="stable")[:TOP_CONFUSIONS]
    out: dict[str, Any] = {"confusion_top": [
        {"true": class_names[int(t)], "predicted": class_names[int(p)], "count": int(c)}
        for t, p, c in zip(pairs[0][off][order], pairs[1][off][order], counts[off][order],
                           strict=True)]}
    if k <= MAX_DENSE_CLASSES:
        conf = np.zeros((k, k), dtype=np.int64)
        conf[pairs[0], pairs[1]] = counts
        out["confusion_matrix"] = conf.tolist()
    return out
