"""What DCT-scaled JPEG decoding (``backbone.decode: scaled``, the default) does to accuracy and
speed: the same probe job on the same large JPEGs, decoded scaled and in full.

The data: sklearn's digits (1797 images, 10 classes) upsampled to ``--size`` px and saved as
JPEG (q90, light noise), so that a full decode costs what a large photo's does. Printed: test
top-1 of both jobs (same splits, same seed), their difference in points, and each job's
extraction images/s.

    python benchmarks/decode_accuracy.py --size 1600
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def digits_folder(root: Path, side: int, seed: int = 0) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    d = load_digits()
    for i, (im, y) in enumerate(zip(d.images, d.target, strict=True)):
        big = np.asarray(Image.fromarray(np.round(im * 255 / 16).astype(np.uint8))
                         .resize((side, side), Image.Resampling.BICUBIC), np.float32)
        big += rng.standard_normal(big.shape, dtype=np.float32) * np.float32(3.0)
        folder = root / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).convert("RGB").save(
            folder / f"{i:04d}.jpg", quality=90)
    return root


def main() -> None:
    from pipeline.client.api import submit
    from pipeline.spec import JobSpec
    from workers.launcher import local_cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1600)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ff-decode-") as tmp:
        work = Path(tmp)
        t0 = time.time()
        folder = digits_folder(work / "digits", args.size)
        print(f"wrote 1797 JPEGs of {args.size}x{args.size} ({time.time() - t0:.0f} s)",
              flush=True)
        out: dict[str, Any] = {"size": args.size, "image_size": args.image_size}
        with local_cluster(work / "cluster") as c:
            for mode in ("scaled", "full"):
                spec = JobSpec.from_dict({
                    "name": f"decode-{mode}", "data": {"source": "imagefolder",
                                                       "path": str(folder), "shard_size": 256},
                    "backbone": {"image_size": args.image_size, "decode": mode},
                    "quality": {"enabled": False},
                    "output": str(work / "out"), "store": str(work / "store")})
                job = submit(spec, broker=c.broker)
                st = job.wait(timeout=3600)
                if st["status"] != "SUCCESS":
                    raise SystemExit(f"{mode}: {st['status']} {st.get('error')}")
                rep = job.result()
                rows = [s for s in rep["shards"] if s.get("images_per_s")]
                out[mode] = {"top1": rep["metrics"]["top1"],
                             "extract_img_s_per_task": round(float(np.mean(
                                 [s["images_per_s"] for s in rows])), 1),
                             "decode": sorted({str(s.get("decode")) for s in rows})}
                print(mode, json.dumps(out[mode]), flush=True)
    diff = (out["scaled"]["top1"] - out["full"]["top1"]) * 100
    out["top1_difference_points"] = round(diff, 2)
    print(f"\ntest top-1: scaled {out['scaled']['top1']:.4f}, full {out['full']['top1']:.4f} "
          f"({diff:+.2f} points); extraction {out['scaled']['extract_img_s_per_task']} vs "
          f"{out['full']['extract_img_s_per_task']} img/s per task")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
