"""Batch prediction on the fleet vs the same classifier called in a plain loop.

Trains a probe (digits, EfficientNet-Lite0 at ``--image-size``), writes a folder of
``--images`` PNGs (digits at 32 px, each with a little noise so every file is distinct),
then predicts the whole folder three ways and prints predictions per second:

- ``plain loop``: ``load_classifier(job).predict(files)`` in batches of 256, one process
  (what a user writes by hand);
- ``fleet, first run``: ``kind: predict`` on a private Redis + ``--workers`` extraction
  worker processes (planning, digests, extraction, the head, Parquet + CSV, the report);
- ``fleet, rerun``: the same job again: every feature comes from the store.

    .venv/bin/python benchmarks/predict_throughput.py [--images 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import submit
from pipeline.spec import JobSpec
from workers.launcher import local_cluster


def write_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        base = np.kron(d.images[k % len(d.images)] * 15, np.ones((4, 4)))
        im = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        path = root / f"img{k:06d}.png"
        Image.fromarray(im).save(path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=1000)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="ff-predict-bench-"))
    t0 = time.time()
    files = write_folder(out / "images", args.images)
    print(f"wrote {len(files)} images in {time.time() - t0:.1f} s", flush=True)
    results: dict[str, dict[str, float]] = {}
    with local_cluster(out / "cluster", extract_workers=args.workers) as c:
        train = JobSpec.from_dict({
            "name": "bench-train", "data": {"source": "digits"}, "quality": {"enabled": False},
            "backbone": {"image_size": args.image_size}, "output": str(out / "runs")})
        job = submit(train, broker=c.broker)
        st = job.wait(timeout=3600)
        assert st["status"] == "SUCCESS", st.get("error")
        model = Path(st["job_dir"])
        spec = JobSpec.from_dict({
            "name": "bench-predict", "kind": "predict", "output": str(out / "runs"),
            "data": {"source": "images", "path": str(out / "images"),
                     "shard_size": args.shard_size},
            "predict": {"model": str(model)}})
        for label in ("fleet, first run", "fleet, rerun (features from the store)"):
            t = time.time()
            pj = submit(spec, broker=c.broker)
            st = pj.wait(timeout=7200)
            assert st["status"] == "SUCCESS", st.get("error")
            wall = time.time() - t
            results[label] = {"seconds": round(wall, 1),
                              "per_s": round(len(files) / wall, 1)}
            print(f"{label}: {wall:.1f} s", flush=True)
            fleet_rep = pj.result()
    # the plain loop runs with the cluster stopped: it gets the whole machine
    from pipeline.predict import load_classifier

    t = time.time()
    clf = load_classifier(model)
    answers = []
    for i in range(0, len(files), 256):
        answers += clf.predict([str(f) for f in files[i: i + 256]])
    wall = time.time() - t
    results["plain loop (one process)"] = {"seconds": round(wall, 1),
                                           "per_s": round(len(files) / wall, 1)}
    import pandas as pd

    table = pd.read_parquet(fleet_rep["predictions"]["files"]["parquet"]).set_index(
        "sample_id")
    same = sum(table.loc[f.name, "predicted"] == a["label"]
               for f, a in zip(files, answers, strict=True))
    print(f"\n{len(files)} images at {args.image_size} px, EfficientNet-Lite0 + linear probe, "
          f"{os.cpu_count()} CPU cores, {args.workers} extraction worker(s)")
    print(f"{'method':42} {'seconds':>8} {'predictions/s':>14}")
    for label, r in results.items():
        print(f"{label:42} {r['seconds']:8.1f} {r['per_s']:14.1f}")
    print(f"same label as the plain loop: {same}/{len(files)}")
    print(json.dumps({"images": len(files), "image_size": args.image_size,
                      "workers": args.workers, "results": results,
                      "agree_with_plain_loop": same}, indent=2))


if __name__ == "__main__":
    main()
