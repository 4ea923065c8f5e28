"""Training on cached features: the regularization sweep and fitting every head.

Stage functions take features and settings, not plans: the caller says which shards and which
sample ids (the plan's split lists) make up train and val. Every head of a job sees the same
rows: the plan's ids that were extracted (a sample that could not be decoded is absent for
all of them alike).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import JobError
from pipeline.heads import knn, linear, mlp
from pipeline.spec import ProbeSpec
from pipeline.store.shards import ShardReader


@dataclass
class Features:
    """One split's features, labels and sample indices (ascending)."""

    x: np.ndarray
    y: np.ndarray
    idx: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def read_splits(paths: list[str], ids: Mapping[str, Sequence[int]],
                dtype: Any = np.float32) -> dict[str, Features]:
    """The rows of each named split (by sample id) from the shards, one pass per split.

    Each split's features are held in memory once, in their own array (rows x dim
    ``dtype``; float16 is the stored dtype and half the memory): the probe fits full-batch.

    Raises:
        JobError: a row that is not finite (NaN/inf): no head can be fitted on it.
    """
    out = {}
    for name, members in ids.items():
        x, y, idx = ShardReader(paths, np.asarray(members, np.int64)).read(dtype)
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1)) if x.size else np.zeros(0, np.int64)
        if len(bad):
            raise JobError(f"{len(bad)} of {len(x)} {name} feature rows are not finite (NaN or "
                           f"inf; e.g. sample index {int(idx[bad[0]])}); fix: the backbone "
                           "overflowed or the data holds NaN (float arrays): use "
                           "backbone.precision bf16 or fp32, and check the data's values")
        out[name] = Features(x, y, idx)
    return out


def require(features: dict[str, Features], job: str) -> None:
    """Every split has rows.

    Raises:
        JobError: a split lost all its samples (every one was skipped).
    """
    for name, f in features.items():
        if len(f) == 0:
            raise JobError(f"job {job}: no {name} features (every {name} sample was skipped); "
                           "fix: check the data source")


CV_BELOW_PER_CLASS = 5  # validation samples per class below which λ is chosen by CV
CV_FOLDS = 3
CV_GRID_STEP = 3  # with a handful of labels a 45-point grid is finer than the noise


def sweep_slice(train: Features, val: Features, n_classes: int, grid: list[float],
                max_iter: int, seed: int = 0) -> list[dict[str, Any]]:
    """The probe fitted and scored on validation over one slice of the λ grid.

    With fewer than :data:`CV_BELOW_PER_CLASS` validation samples per class (a few labels)
    the validation split cannot rank penalties: λ is scored by stratified k-fold
    cross-validation on train + val instead (every labeled sample validates once), on every
    :data:`CV_GRID_STEP`-th penalty of the slice (the same number of fits as the validation
    sweep)."""
    classes = max(1, len(np.unique(train.y)))
    if len(val) >= CV_BELOW_PER_CLASS * classes:
        return [{**p, "scored_by": "validation"}
                for p in linear.sweep(train.x, train.y, val.x, val.y, n_classes, grid,
                                      max_iter)]
    x = np.concatenate([train.x, val.x])
    y = np.concatenate([train.y, val.y])
    smallest = int(np.bincount(y)[np.unique(y)].min())
    k = min(CV_FOLDS, smallest)
    if k < 2:  # a class with one labeled sample: no fold can hold it out
        return [{**p, "scored_by": "validation"}
                for p in linear.sweep(train.x, train.y, val.x, val.y, n_classes, grid,
                                      max_iter)]
    fold = np.empty(len(y), np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = np.arange(len(members)) % k
    coarse = list(grid[::CV_GRID_STEP])
    totals = {float(v): {"correct": 0.0, "loss": 0.0, "n": 0, "seconds": 0.0} for v in coarse}
    for f in range(k):
        tr, va = fold != f, fold == f
        for p in linear.sweep(x[tr], y[tr], x[va], y[va], n_classes, coarse, max_iter):
            t = totals[p["l2"]]
            t["correct"] += p["val_top1"] * p["val_n"]
            t["loss"] += p["val_loss"] * p["val_n"]
            t["n"] += p["val_n"]
            t["seconds"] += p["seconds"]
    return [{"l2": v, "val_top1": t["correct"] / t["n"], "val_loss": t["loss"] / t["n"],
             "val_n": t["n"], "seconds": t["seconds"], "scored_by": f"{k}-fold cross-validation"}
            for v, t in totals.items()]


def choose_l2(slices: list[dict[str, Any]], n_slices: int) -> tuple[float, dict[str, Any]]:
    """λ from the sweep slices' results: the best validation accuracy (then loss, then the
    strongest penalty); with the whole curve for the report.

    Raises:
        JobError: a slice is missing.
    """
    got = sorted({int(s["slice"]) for s in slices})
    if got != list(range(n_slices)):
        raise JobError(f"sweep results for slices {got}, expected 0..{n_slices - 1}; fix: retry "
                       "the job")
    by_slice = {int(s["slice"]): s for s in slices}  # a slice run twice counts once
    curve = sorted((pt for s in by_slice.values() for pt in s["curve"]), key=lambda p: -p["l2"])
    best = linear.select(curve)
    top = max(pt["val_top1"] for pt in curve)
    se = linear.standard_error(top, int(best.get("val_n", 0)))
    spread = top - min(pt["val_top1"] for pt in curve)
    significant = spread > 2 * se
    return float(best["l2"]), {
        "grid": [pt["l2"] for pt in curve], "curve": curve, "chosen_l2": best["l2"],
        "chosen_val_top1": best["val_top1"], "chosen_val_loss": best["val_loss"],
        "scored_by": best.get("scored_by", "validation"), "significant": significant,
        **({} if significant else {"note": (
            f"every penalty scored within {spread:.3f} top-1 of the others (2 standard errors "
            f"on {best.get('val_n')} samples: {2 * se:.3f}): the choice is not significant; "
            "it went to the lowest validation loss among the best")}),
        "task_seconds": [by_slice[i]["seconds"] for i in sorted(by_slice)]}


def fit_heads(train: Features, val: Features, n_classes: int, probe: ProbeSpec, l2: float,
              meta: dict[str, Any], job_dir: Path, seed: int) -> dict[str, Any]:
    """Refit the linear probe on train+val at ``l2``, fit the other heads, save them all in
    ``job_dir`` (``head.pt`` for the first, ``head-<name>.pt`` for the others)."""
    t0 = time.perf_counter()
    meta = {**meta, "feature_dim": int(train.x.shape[1])}
    out: dict[str, Any] = {"heads": {}}
    for name in probe.heads:
        th = time.perf_counter()
        head: Any
        if name == "linear":
            # The refit is what gets evaluated: converge it fully (the objective is strictly
            # convex, so this is the same optimum scikit-learn reaches); the sweep's fits only
            # rank penalties and stop at probe.max_iter.
            head = linear.fit_probe(np.concatenate([train.x, val.x]),
                                    np.concatenate([train.y, val.y]), n_classes, l2,
                                    max(probe.max_iter, linear.FINAL_FIT_ITERS))
            head.meta = {**meta, "head": "linear", "l2": l2}
        elif name == "mlp":
            head = mlp.fit_mlp(train.x, train.y, val.x, val.y, n_classes, probe.mlp_hidden,
                               probe.mlp_dropout, probe.mlp_epochs, probe.mlp_patience,
                               probe.mlp_lr, probe.mlp_weight_decay, seed=seed)
            head.meta = {**meta, **head.meta, "head": "mlp"}
        else:
            head = knn.fit_knn(train.x, train.y, val.x, val.y, n_classes)
            head.meta = {**meta, **head.meta, "head": "knn", "k": head.k}
        path = job_dir / ("head.pt" if name == probe.heads[0] else f"head-{name}.pt")
        head.save(path)
        out["heads"][name] = {"path": str(path), "seconds": round(time.perf_counter() - th, 3),
                              **{k: v for k, v in head.meta.items()
                                 if k in ("l2", "k", "best_epoch", "val_top1")}}
    out.update(primary=probe.heads[0], l2=l2, train_samples=len(train), val_samples=len(val),
               feature_dim=int(train.x.shape[1]), seconds=round(time.perf_counter() - t0, 3))
    return out
