from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.evaluate import classification_metrics
from pipeline.heads.linear import LinearHead, fit_probe


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
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["ece"] == pytest.approx(_ece_by_sorting(y, proba), abs=1e-12)


def _ece_by_sorting(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE computed another way: sort by confidence, cut at the bin edges."""
    conf = proba.max(1)
    hit = (proba.argmax(1) == y).astype(float)
    order = np.argsort(conf)
    conf, hit = conf[order], hit[order]
    cuts = np.searchsorted(conf, np.linspace(0, 1, bins + 1), side="right")
    total = 0.0
    for lo, hi in itertools.pairwise(cuts):
        if hi > lo:
            total += (hi - lo) * abs(hit[lo:hi].mean() - conf[lo:hi].mean())
    return total / len(y)


def test_ece_on_hand_made_cases() -> None:
    names = ["a", "b"]
    sure_and_right = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert classification_metrics(np.array([0, 1]), sure_and_right, names)["ece"] == 0.0
    sure_and_wrong = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert classification_metrics(np.array([0, 1]), sure_and_wrong, names)["ece"] == 1.0
    # four samples at 0.7 confidence, three right: |0.75 - 0.7| = 0.05
    p = np.array([[0.7, 0.3]] * 4)
    assert classification_metrics(np.array([0, 0, 0, 1]), p, names)["ece"] == pytest.approx(0.05)
    # macro F1 by hand: class a (P=1, R=0.5, F1=2/3), class b (P=0.5, R=1, F1=2/3)
    p2 = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9]])
    m = classification_metrics(np.array([0, 0, 1]), p2, names)
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_reports_stay_small_at_any_class_count(tmp_path: Path) -> None:
    """3,000 classes: no k x k matrix anywhere (metrics, JSON, page); the most frequent
    confusions agree with an independent count; the per-class bars are bounded; predictions
    whose labels look like spreadsheet formulas are written as text."""
    import collections
    import json

    from pipeline.reports.plots import confusion_svg, f1_svg
    from pipeline.reports.report import write_predictions

    rng = np.random.default_rng(0)
    k, n = 3000, 6000
    names = [f"c{i}" for i in range(k)]
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.5, y, rng.integers(0, 20, n))  # errors pile on 20
    proba = np.full((n, k), 1e-6, np.float32)
    proba[np.arange(n), pred] = 1.0
    m = classification_metrics(y, proba, names)
    assert "confusion_matrix" not in m and len(m["confusion_top"]) == 50
    want = collections.Counter((int(a), int(b)) for a, b in zip(y, pred, strict=True) if a != b)
    top = [(names.index(c["true"]), names.index(c["predicted"]), c["count"])
           for c in m["confusion_top"]]
    assert sorted(c for _, _, c in top) == sorted(want.values())[-50:]
    assert all(want[(t, p)] == c for t, p, c in top)
    assert m["top1"] == pytest.approx(float((pred == y).mean()))
    assert len(json.dumps(m)) < 1_000_000
    assert confusion_svg(m.get("confusion_matrix"), names) == ""
    assert f1_svg(m["per_class"]).count("<rect") == 40
    path = write_predictions(tmp_path, ["=HYPERLINK(x)", "ok"], np.array([0, 1]),
                             np.array([0, 1]), np.eye(2, dtype=np.float32), ["+1", "@b"])
    rows = path.read_text().splitlines()
    assert rows[1].startswith("'=HYPERLINK(x),0,'+1,'+1,") and ",'@b,'@b," in rows[2]
