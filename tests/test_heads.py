from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.heads import knn as knn_head
from pipeline.heads import linear as probe
from pipeline.heads import load_head
from pipeline.heads import mlp as mlp_head


def _blobs(n: int, d: int = 16, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(42).normal(scale=1.2, size=(k, d))
    y = rng.integers(0, k, size=n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_tiny_but_informative_features_are_standardized_not_dropped() -> None:
    """An untrained network's features can all be ~1e-10 (vanishing activations) and still
    separate the classes: scale is judged relative to the largest feature, so they are
    standardized (as sklearn's StandardScaler does) rather than treated as constant."""
    from pipeline.heads import standardize_stats

    x, y = _blobs(300, d=8)
    x = np.concatenate([x * 1e-10, np.full((300, 1), 3.0, np.float32)], axis=1)
    _, scale = standardize_stats(x)
    ref = StandardScaler().fit(x.astype(np.float64))
    np.testing.assert_allclose(scale[:8], ref.scale_[:8], rtol=1e-4)
    assert scale[8] == 1.0  # the truly constant feature
    head = probe.fit_probe(x[:200], y[:200], 3, l2=1e-3, max_iter=300)
    assert (head.predict_proba(x[200:]).argmax(1) == y[200:]).mean() > 0.8


def test_grid_is_the_protocol_grid() -> None:
    g = probe.l2_grid()
    assert len(g) == 45 and g[0] == 1e5 and abs(g[-1] - 1e-6) < 1e-18
    assert all(a > b for a, b in itertools.pairwise(g))


def test_sweep_selection_matches_sklearn_on_the_same_split() -> None:
    x, y = _blobs(300)
    xv, yv = _blobs(150, seed=1)
    grid = probe.l2_grid(12, 1e-4, 1e2)
    curve = probe.sweep(x, y, xv, yv, 3, grid, max_iter=300)
    assert [p["l2"] for p in curve] == grid
    scaler = StandardScaler().fit(x)
    for point in curve[::3]:
        ref = LogisticRegression(C=1 / (point["l2"] * len(y)), max_iter=5000, tol=1e-10)
        ref.fit(scaler.transform(x), y)
        ref_acc = (ref.predict(scaler.transform(xv)) == yv).mean()
        assert abs(point["val_top1"] - ref_acc) <= 1 / len(yv) + 1e-9, point
    best = probe.select(curve)
    top = max(p["val_top1"] for p in curve)
    se = probe.standard_error(top, len(yv))
    close = [p for p in curve if p["val_top1"] >= top - se]  # indistinguishable from the best
    assert best in close and best["val_loss"] == min(p["val_loss"] for p in close)


def test_a_tiny_validation_split_never_selects_a_uniform_head() -> None:
    """Few labels (2 validation samples per class): every penalty ties on accuracy; the loss
    decides, so the strongest penalty (near-uniform probabilities, log loss ~ ln K) is not
    chosen when another predicts better; λ is scored by cross-validation on train + val."""
    from pipeline.train import Features, choose_l2, sweep_slice

    x, y = _blobs(30, seed=3)  # 10 per class
    xv, yv = _blobs(6, seed=4)  # 2 per class
    grid = probe.l2_grid(12, 1e-4, 1e5)
    curve = sweep_slice(Features(x, y, np.arange(30)), Features(xv, yv, np.arange(6)), 3, grid,
                        300)
    assert {p["scored_by"] for p in curve} == {"3-fold cross-validation"}
    assert all(p["val_n"] == 36 for p in curve) and len(curve) == len(grid[::3])
    l2, sweep = choose_l2([{"slice": 0, "curve": curve, "seconds": 0.1}], 1)
    assert l2 < 1e5 and sweep["chosen_val_loss"] < np.log(3) - 0.1
    assert sweep["scored_by"] == "3-fold cross-validation"


def test_mlp_and_knn_learn_and_round_trip(tmp_path: Path) -> None:
    x, y = _blobs(400)
    xv, yv = _blobs(100, seed=1)
    xt, yt = _blobs(200, seed=2)
    mlp = mlp_head.fit_mlp(x, y, xv, yv, 3, hidden=32, epochs=30, patience=5, seed=0)
    knn = knn_head.fit_knn(x, y, xv, yv, 3)
    for head, name in ((mlp, "mlp"), (knn, "knn")):
        acc = (head.predict_proba(xt).argmax(1) == yt).mean()
        assert acc > 0.8, (name, acc)
        head.meta = {**head.meta, "class_names": ["a", "b", "c"]}
        head.save(tmp_path / f"{name}.pt")
        back = load_head(tmp_path / f"{name}.pt")
        np.testing.assert_allclose(back.predict_proba(xt), head.predict_proba(xt), atol=1e-3)
        assert back.meta["class_names"] == ["a", "b", "c"]
    # k is the one an independent cosine kNN (scikit-learn) scores best on validation
    from sklearn.neighbors import KNeighborsClassifier

    scores = {k: KNeighborsClassifier(k, metric="cosine").fit(x, y).score(xv, yv)
              for k in knn.meta["val_top1_by_k"]}
    assert scores[knn.k] == pytest.approx(max(scores.values()), abs=2 / len(yv))
    assert knn.meta["val_top1"] == pytest.approx(scores[knn.k], abs=2 / len(yv))
    # Same seed, same MLP.
    again = mlp_head.fit_mlp(x, y, xv, yv, 3, hidden=32, epochs=30, patience=5, seed=0)
    np.testing.assert_allclose(again.predict_proba(xt), mlp.predict_proba(xt), atol=1e-6)
