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
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    tp = np.diag(conf).astype(float)
    support = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=(precision + recall) > 0)
    top5 = np.argsort(-proba, axis=1)[:, : min(5, k)]
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
        "confusion_matrix": conf.tolist(),
    }
