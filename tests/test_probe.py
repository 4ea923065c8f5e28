from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.evaluate import classification_metrics
from pipeline.probe import LinearHead, fit_probe


def _blobs(n: int = 600, d: int = 20, k: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.5, size=(k, d))
    y = rng.integers(0, k, size=n)
    x = centers[y] + rng.normal(size=(n, d)) + 5.0  # offset: standardization matters
    return x.astype(np.float32), y


def test_probe_matches_sklearn_logistic_regression() -> None:
    x, y = _blobs()
    xt, _yt = _blobs(seed=1)
    l2 = 1e-2
    head = fit_probe(x[:400], y[:400], 4, l2=l2)
    scaler = StandardScaler().fit(x[:400])
    ref = LogisticRegression(C=1.0 / (l2 * 400), max_iter=5000, tol=1e-10)
    ref.fit(scaler.transform(x[:400]), y[:400])
    ours = head.predict_proba(xt)
    theirs = ref.predict_proba(scaler.transform(xt))
    # Same objective -> same minimiser: probabilities agree closely.
    assert np.abs(ours - theirs).max() < 2e-3
    assert (ours.argmax(1) == theirs.argmax(1)).mean() > 0.995


def test_head_save_load_round_trip(tmp_path: Path) -> None:
    x, y = _blobs(n=200)
    head = fit_probe(x, y, 4, l2=1e-3)
    head.meta = {"class_names": ["a", "b", "c", "d"], "backbone": "efficientnet_lite0"}
    head.save(tmp_path / "head.pt")
    back = LinearHead.load(tmp_path / "head.pt")  # weights_only=True inside
    np.testing.assert_allclose(back.predict_proba(x), head.predict_proba(x), rtol=1e-6)
    assert back.meta["class_names"] == ["a", "b", "c", "d"]


def test_metrics_agree_with_sklearn() -> None:
    rng = np.random.default_rng(0)
    k = 7
    y = rng.integers(0, k, 500)
    logits = rng.normal(size=(500, k)) + 2.0 * np.eye(k)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = [f"c{i}" for i in range(k)]
    m = classification_metrics(y, proba, names)
    pred = proba.argmax(1)
    assert m["top1"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["top5"] == pytest.approx(skm.top_k_accuracy_score(y, proba, k=5))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    for i, name in enumerate(names):
        assert m["per_class"][name]["precision"] == pytest.approx(p[i])
        assert m["per_class"][name]["recall"] == pytest.approx(r[i])
        assert m["per_class"][name]["f1"] == pytest.approx(f[i])
        assert m["per_class"][name]["support"] == s[i]
    assert 0.0 <= m["ece"] <= 1.0
