"""The one split computation: which samples are train, val and test.

Computed once, at planning, and stored in the plan as sample indices. Every consumer (the
probe's sweep and refit, the MLP and kNN heads, fine-tuning, evaluation, the quality stage)
reads the plan's lists, so they all see the same samples; a sample that cannot be decoded drops
out of its split for everyone alike.

The data's own splits are used when it has them (``train/``, ``val/``, ``test/`` folders, a
manifest's ``split`` column, a torchvision dataset's parts). Otherwise test is carved from all
samples, stratified and seeded (``data.test_fraction``, ``data.seed``); val is carved from train
the same way (``probe.val_fraction``), every class keeping at least one training sample.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from pipeline.errors import DataError


def stratified_pick(labels: np.ndarray, pool: np.ndarray, n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``n`` indices from ``pool`` with class proportions kept (largest remainders)."""
    if n <= 0 or len(pool) == 0:
        return np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(labels[pool], return_counts=True)
    exact = counts * n / len(pool)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    picked = [rng.permutation(pool[labels[pool] == c])[:k]
              for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``labels``) kept and carved out: stratified, seeded, every class keeping
    at least one sample."""
    rng = np.random.default_rng(seed)
    pick = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = min(round(len(rows) * fraction), len(rows) - 1)
        pick.append(rng.permutation(rows)[:take])
    out = np.sort(np.concatenate(pick)) if pick else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), out), out


def compute_splits(labels: np.ndarray, predefined: dict[str, np.ndarray] | None, *,
                   seed: int, test_fraction: float, val_fraction: float,
                   limit: int | None = None,
                   exclude: Collection[int] = ()) -> dict[str, np.ndarray]:
    """train / val / test sample indices (sorted int64 arrays, disjoint).

    ``exclude``: indices never used (duplicates, conflicting labels), removed before splitting.

    Raises:
        DataError: too few samples or classes for a classifier.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = np.ones(len(labels), dtype=bool)
    if len(exclude):
        keep[np.fromiter(exclude, dtype=np.int64)] = False
    if predefined is None:
        pool = np.flatnonzero(keep)
        if limit is not None and limit < len(pool):
            pool = np.sort(stratified_pick(labels, pool, limit, rng))
        test = stratified_pick(labels, pool, round(len(pool) * test_fraction), rng)
        splits = {"train": np.setdiff1d(pool, test), "test": np.sort(test)}
    else:
        splits = {k: np.sort(v[keep[v]]) for k, v in predefined.items()}
        if limit is not None:
            splits = {k: np.sort(stratified_pick(labels, v, min(len(v), limit), rng))
                      for k, v in splits.items()}
        if "test" not in splits:
            train = splits["train"]
            test = stratified_pick(labels, train, round(len(train) * test_fraction), rng)
            splits = {**splits, "train": np.setdiff1d(train, test), "test": np.sort(test)}
    classes = np.unique(labels[splits["train"]])
    if len(classes) < 2:
        raise DataError(f"the training split has {len(classes)} class(es) "
                        f"({len(splits['train'])} samples); fix: a classifier needs at least two "
                        "classes with samples each")
    if len(splits["test"]) == 0:
        raise DataError(f"the test split is empty ({len(labels)} samples in all); fix: add "
                        "samples or raise data.test_fraction")
    if "val" not in splits or len(splits["val"]) == 0:
        train = splits["train"]
        kept, carved = carve(labels[train], val_fraction, seed)
        splits = {**splits, "train": train[kept], "val": train[carved]}
    if len(splits["val"]) == 0:
        raise DataError(f"the validation split is empty ({len(splits['train'])} training "
                        "samples, every class needs one left for training); fix: add samples or "
                        "raise probe.val_fraction")
    return {k: np.asarray(splits[k], dtype=np.int64) for k in ("train", "val", "test")}
