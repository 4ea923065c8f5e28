"""Training on cached features: splits, the regularization sweep, and the heads.

All heads of a job share one train/val/test split: the data's own val split when it has one,
else a stratified slice of train carved with the data seed. The assignment is written to
``splits.json`` in the job folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import heads, probe, store
from pipeline.errors import JobError
from pipeline.plan import Plan


@dataclass
class Features:
    """One split's features, labels and data indices."""

    x: np.ndarray
    y: np.ndarray
    idx: np.ndarray


def _read(paths: list[str]) -> Features:
    # The probe fits full-batch L-BFGS, so a split's features are held in memory once
    # (rows x dim float32); they are read into that one array without extra copies.
    return Features(*store.ShardReader(paths).read_all())


def checked_paths(plan: Plan, split: str, recorded: set[str]) -> list[str]:
    """The split's shard paths, after checking each was extracted (or cached) and is valid."""
    paths = []
    for s in plan.shards_of(split):
        if not (s.cached or s.id in recorded) or not store.valid_shard(s.path, plan.key, s.rows):
            raise JobError(f"shard {s.id} of job {plan.job_id} is missing or invalid at "
                           f"{s.path!r}; fix: rerun the job (valid shards are reused)")
        paths.append(s.path)
    return paths


def carve_val(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows kept for training and rows for validation: stratified, seeded, every class kept
    in train."""
    rng = np.random.default_rng(seed)
    pick = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        take = min(round(len(rows) * fraction), len(rows) - 1)
        pick.append(rng.permutation(rows)[:take])
    val_rows = np.sort(np.concatenate(pick))
    return np.setdiff1d(np.arange(len(y)), val_rows), val_rows


def load_splits(plan: Plan, recorded: set[str]) -> dict[str, Features]:
    """train / val / test features; val carved from train (seeded, stratified) if absent."""
    spec = plan.job_spec
    train = _read(checked_paths(plan, "train", recorded))
    if len(train.y) == 0:
        raise JobError(f"job {plan.job_id}: no training features (every sample was skipped); "
                       "fix: check the data source")
    if plan.shards_of("val"):
        val = _read(checked_paths(plan, "val", recorded))
    else:
        keep, val_rows = carve_val(train.y, spec.probe.val_fraction, spec.data.seed)
        val = Features(train.x[val_rows], train.y[val_rows], train.idx[val_rows])
        train = Features(train.x[keep], train.y[keep], train.idx[keep])
    if len(val.y) == 0:
        raise JobError(f"job {plan.job_id}: the validation split is empty; fix: add samples or "
                       "raise probe.val_fraction")
    return {"train": train, "val": val}


def test_reader(plan: Plan, recorded: set[str]) -> store.ShardReader:
    """The test split, streamed in chunks (evaluation never holds all of it)."""
    return store.ShardReader(checked_paths(plan, "test", recorded))


def grid_slices(plan: Plan) -> list[list[float]]:
    """The L2 grid (strongest first) cut into contiguous slices, one per sweep task."""
    p = plan.job_spec.probe
    grid = probe.l2_grid(p.grid_points, p.grid_low, p.grid_high)
    n = min(p.sweep_tasks, len(grid))
    return [list(chunk) for chunk in np.array_split(np.asarray(grid), n) if len(chunk)]


def sweep_slice(plan: Plan, recorded: set[str], index: int) -> dict[str, Any]:
    """Fit and score the probe over one slice of the grid (warm starts along it)."""
    t0 = time.perf_counter()
    sp = load_splits(plan, recorded)
    curve = probe.sweep(sp["train"].x, sp["train"].y, sp["val"].x, sp["val"].y,
                        len(plan.class_names), grid_slices(plan)[index],
                        plan.job_spec.probe.max_iter)
    return {"slice": index, "curve": curve, "seconds": round(time.perf_counter() - t0, 3)}


def fit_heads(plan: Plan, recorded: set[str],
              slices: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Choose the L2 penalty from the sweep (or take the fixed one), refit the linear probe
    on train+val, fit the other heads, save them all in the job folder."""
    t0 = time.perf_counter()
    spec = plan.job_spec
    p = spec.probe
    sp = load_splits(plan, recorded)
    tr, va = sp["train"], sp["val"]
    k = len(plan.class_names)
    meta = {"backbone": spec.backbone.name, "weights": spec.backbone.weights,
            "weights_id": plan.weights_id, "weights_sha256": plan.weights_sha256,
            "preprocessing": plan.preprocessing, "class_names": plan.class_names,
            "feature_dim": int(tr.x.shape[1]), "job_id": plan.job_id}
    out: dict[str, Any] = {"heads": {}, "sweep": None}
    if p.l2 is None:
        got = sorted(s["slice"] for s in slices or [])
        if got != list(range(len(grid_slices(plan)))):
            raise JobError(f"job {plan.job_id}: sweep results for slices {got}, expected "
                           f"{len(grid_slices(plan))}; fix: retry the job")
        curve = sorted((pt for s in slices or [] for pt in s["curve"]),
                       key=lambda pt: -pt["l2"])
        best = probe.select(curve)
        l2 = best["l2"]
        out["sweep"] = {"grid": [pt["l2"] for pt in curve], "curve": curve, "chosen_l2": l2,
                        "chosen_val_top1": best["val_top1"],
                        "task_seconds": [s["seconds"] for s in slices or []]}
    else:
        l2 = p.l2
    job_dir = plan.job_dir
    for name in p.heads:
        th = time.perf_counter()
        if name == "linear":
            x = np.concatenate([tr.x, va.x])
            y = np.concatenate([tr.y, va.y])
            # The refit is what gets evaluated: converge it fully (the objective is strictly
            # convex, so this is the same optimum scikit-learn reaches); the sweep's fits only
            # rank penalties and stop at probe.max_iter.
            head: Any = probe.fit_probe(x, y, k, l2, max(p.max_iter, probe.FINAL_FIT_ITERS))
            head.meta = {**meta, "head": "linear", "l2": l2}
        elif name == "mlp":
            head = heads.fit_mlp(tr.x, tr.y, va.x, va.y, k, p.mlp_hidden, p.mlp_dropout,
                                 p.mlp_epochs, p.mlp_patience, p.mlp_lr, p.mlp_weight_decay,
                                 seed=spec.data.seed)
            head.meta = {**meta, **head.meta, "head": "mlp"}
        else:
            head = heads.fit_knn(tr.x, tr.y, va.x, va.y, k)
            head.meta = {**meta, **head.meta, "head": "knn", "k": head.k}
        path = job_dir / ("head.pt" if name == p.heads[0] else f"head-{name}.pt")
        head.save(path)
        out["heads"][name] = {"path": str(path), "seconds": round(time.perf_counter() - th, 3),
                              **{k2: v for k2, v in head.meta.items()
                                 if k2 in ("l2", "k", "best_epoch", "val_top1")}}
    (job_dir / "splits.json").write_text(json.dumps(
        {name: f.idx.tolist() for name, f in sp.items()}))
    out.update(primary=p.heads[0], l2=l2, train_samples=len(tr.y),
               val_samples=len(va.y), seconds=round(time.perf_counter() - t0, 3))
    return out
