"""Seconds and peak memory of each quality-stage task on a large feature set.

Writes ``--rows`` (default 100,000) x ``--dim`` (1,280) float16 features (plus 256-d image
signatures and 64 x 64 pictures) in HDF5 shards, Gaussian clusters for ``--classes``
classes, then runs each kind of task the stage fans out — one neighbour block
(``quality.block_rows`` query rows against every row, features then signatures, then the
aligned and fine-detail scores of its candidates), one out-of-fold fold, the largest
learning-curve point (100% of train), the train-vs-test domain classifier — each in a
fresh process, and prints its wall seconds and peak resident memory (``ru_maxrss``). The
target: every task under 2 GB.

    python benchmarks/quality_scale.py            # 100k x 1280 (~6 min on 2 cores)
    python benchmarks/quality_scale.py --rows 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def write(out: Path, rows: int, dim: int, classes: int, shard: int = 5000) -> list[str]:
    from pipeline.store.shards import ShardData, write_shard

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    paths = []
    for s in range(0, rows, shard):
        e = min(rows, s + shard)
        y = rng.integers(0, classes, e - s)
        x = centers[y] + 2.0 * rng.normal(size=(e - s, dim)).astype(np.float32)
        sig = rng.normal(size=(e - s, 256)).astype(np.float16)
        pics = rng.integers(0, 256, (e - s, 64 * 64), dtype=np.uint8)
        p = out / f"{s}-{e}.h5"
        write_shard(p, ShardData(features=x.astype(np.float16), labels=y.astype(np.int64),
                                 indices=np.arange(s, e), sample_ids=[str(i) for i in range(s, e)],
                                 skipped=[], attrs={}, signatures=sig,
                                 details=pics))
        paths.append(str(p))
    return paths


def task(kind: str, paths: list[str], rows: int, classes: int, block: int,
         queue: Any) -> None:
    from pipeline.quality import curve, labels, neighbors, shift
    from pipeline.store.shards import ShardReader

    t0 = time.perf_counter()
    ids = np.arange(rows)
    if kind == "neighbors":
        nb = neighbors.search(paths, ids[:block], ids, 10)  # as run_neighbors does
        nb = nb.with_signatures(neighbors.search(paths, ids[:block], ids, 10,
                                                 field="signatures"))
        nb = nb.with_aligned(paths).with_detail(paths)
        info = (f"{len(nb.idx)} query rows x {rows}: features, signatures, aligned, "
                f"detail")
    elif kind == "curve":  # as run_curve reads: train and val, each its own array
        from pipeline.train import read_splits

        cut = int(rows * 0.8)
        s = read_splits(paths, {"train": ids[:cut], "val": ids[cut:]}, np.float16)
        tr, va = s["train"], s["val"]
        pt = curve.point(tr.x, tr.y, va.x, va.y, classes, 1.0, 0, 1e-3, 200)
        info = f"{pt['samples']} training rows, val top-1 {pt['val_top1']}"
    else:
        x, y, _ = ShardReader(paths, ids).read(np.float16)  # as the quality tasks read
        if kind == "fold":
            folds, _ = labels.fold_of(y, 5, 0)
            p = labels.out_of_fold(x, y, folds, 0, classes, 1e-3, 200)
            info = f"fit on {int((folds != 0).sum())}, predicted {len(p)}"
        else:
            half = rows // 2
            r = shift.domain_auc(x[:half], y[:half], x[half:], y[half:], 0)
            info = f"AUC {r['auc']} on {r['samples']}"
    queue.put({"task": kind, "seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "what": info})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--block-rows", type=int, default=20_000)
    ap.add_argument("--tasks", default="neighbors,fold,curve,shift")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ff-qscale-") as tmp:
        t0 = time.perf_counter()
        paths = write(Path(tmp), args.rows, args.dim, args.classes)
        print(f"wrote {args.rows} x {args.dim} float16 in {len(paths)} shards "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        ctx = mp.get_context("spawn")
        results = []
        for kind in args.tasks.split(","):
            q = ctx.Queue()
            p = ctx.Process(target=task, args=(kind, paths, args.rows, args.classes,
                                               args.block_rows, q))
            p.start()
            r = q.get()
            p.join()
            results.append(r)
            print(f"{r['task']:>9}: {r['seconds']:7.1f} s  peak {r['peak_rss_mb']:6d} MB  "
                  f"({r['what']})", flush=True)
    worst = max(r["peak_rss_mb"] for r in results)
    print(f"largest peak: {worst} MB ({'under' if worst < 2048 else 'OVER'} the 2 GB target)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
