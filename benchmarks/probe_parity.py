"""Linear-probe parity and speed against scikit-learn, on real EfficientNet-Lite0 digits features.

Both sides see the same standardized features, the same validation split (the job plan's)
and the same 45-point L2 grid (1e-6 .. 1e5); each picks the value with the best validation
accuracy, refits on train+val and is scored once on test.
scikit-learn: ``LogisticRegression(C=1/(l2*n), solver='lbfgs', max_iter=1000)`` per value, as a
user would run the grid. featurefleet: ``pipeline.heads.linear.sweep`` (torch L-BFGS, warm starts).

    python benchmarks/probe_parity.py [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.extract import Target, extract_shard
from pipeline.heads import linear as probe
from pipeline.planner import make_plan
from pipeline.sources import open_source
from pipeline.spec import BackboneSpec, DataSpec, JobSpec
from pipeline.train import read_splits

FINAL_ITERS = probe.FINAL_FIT_ITERS


def features(image_size: int, out: Path) -> dict[str, np.ndarray]:
    """Lite0 features of every digit, split as a job splits them (the plan's train/val/test)."""
    spec = JobSpec(data=DataSpec(source="digits", shard_size=600),
                   backbone=BackboneSpec(image_size=image_size), output=str(out))
    plan = make_plan(spec, "00000000aa11")
    source = open_source(plan.spec.data)
    for s in plan.shards:
        extract_shard(source, plan.extract_ids[s.start: s.end], plan.backbone,
                      plan.spec.backbone, Target(s.path, plan.key, plan.created))
    splits = read_splits([s.path for s in plan.shards], {
        "train": plan.splits.train, "val": plan.splits.val, "test": plan.splits.test})
    got = {}
    for name, f in splits.items():
        got[name + "_x"], got[name + "_y"] = f.x, f.y
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--features", default=None, help="reuse an .npz of features")
    args = ap.parse_args()
    if args.features and Path(args.features).is_file():
        f = dict(np.load(args.features))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            f = features(args.image_size, Path(tmp))
        if args.features:
            np.savez(args.features, **f)
    xtr, ytr = f["train_x"], f["train_y"]
    xva, yva = f["val_x"], f["val_y"]
    xte, yte = f["test_x"], f["test_y"]
    k = int(ytr.max()) + 1
    grid = probe.l2_grid()

    # Both sides warm up once first (torch's first call pays ~2 s of one-time set-up, which a
    # worker process pays once, not per job).
    probe.fit_probe(xtr[:50], ytr[:50], k, 1.0, 5)
    t0 = time.perf_counter()
    curve = probe.sweep(xtr, ytr, xva, yva, k, grid)
    ours_sweep = time.perf_counter() - t0
    best = probe.select(curve)
    # The final refit is the number users see: converge it fully on both sides (the objective
    # is strictly convex, so both must reach the same optimum).
    head = probe.fit_probe(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), k,
                           best["l2"], max_iter=FINAL_ITERS)
    ours_top1 = float((head.predict_proba(xte).argmax(1) == yte).mean())

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    LogisticRegression(max_iter=5).fit(sc.transform(xtr[:50]), ytr[:50])
    t0 = time.perf_counter()
    sk_curve = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for l2 in grid:
            m = LogisticRegression(C=1.0 / (l2 * len(ytr)), max_iter=1000)
            m.fit(sc.transform(xtr), ytr)
            sk_curve.append({"l2": l2, "val_top1": float((m.predict(sc.transform(xva)) == yva)
                                                         .mean()), "val_loss": 0.0})
        sk_sweep = time.perf_counter() - t0
        sk_best = max(sk_curve, key=lambda p: (p["val_top1"], p["l2"]))
        xall = np.concatenate([xtr, xva])
        sc2 = StandardScaler().fit(xall)
        m = LogisticRegression(C=1.0 / (sk_best["l2"] * len(xall)), max_iter=FINAL_ITERS,
                               tol=1e-8)
        m.fit(sc2.transform(xall), np.concatenate([ytr, yva]))
    sk_top1 = float((m.predict(sc2.transform(xte)) == yte).mean())
    result = {
        "features": [len(ytr) + len(yva) + len(yte), int(xtr.shape[1])], "grid_points": len(grid),
        "featurefleet": {"test_top1": ours_top1, "chosen_l2": best["l2"],
                         "sweep_s": round(ours_sweep, 2)},
        "sklearn": {"test_top1": sk_top1, "chosen_l2": sk_best["l2"],
                    "sweep_s": round(sk_sweep, 2)},
        "top1_gap_points": round(100 * (ours_top1 - sk_top1), 2),
        "speedup": round(sk_sweep / ours_sweep, 1),
    }
    for who, top1, l2, secs in (("featurefleet", ours_top1, best["l2"], ours_sweep),
                                ("scikit-learn", sk_top1, sk_best["l2"], sk_sweep)):
        print(f"{who}: test top-1 {top1:.4f} (l2 {l2:.3g}), sweep {secs:.1f} s")
    print(f"gap {result['top1_gap_points']:+.2f} points (target within 0.3); "
          f"sweep speed-up {result['speedup']}x (target >= 5x)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
