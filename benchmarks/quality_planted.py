"""How well the quality stage finds planted problems (``featurefleet quality`` on a real local
cluster: private Redis, Celery worker processes, real pretrained weights).

The data: sklearn's digits (upsampled) or photo crops from scikit-image's bundled images,
with exact and near copies appended (they land in whatever split the seeded plan gives
them), a few percent of the labels flipped, and out-of-domain images (photo crops among
digits; digits among photos). Printed: recall of cross-split duplicates, precision of the
label-issue flags (and of the ranked list at recall 0.5), out-of-domain images flagged as
outliers, the stage's seconds.

    python benchmarks/quality_planted.py --data digits --image-size 128
    python benchmarks/quality_planted.py --data photos --image-size 224
    python benchmarks/quality_planted.py --clean   # nothing planted: the false alarms
    python benchmarks/quality_planted.py --data photos --max-overlap 0.5   # crops apart
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.quality import planted
from pipeline.spec import JobSpec


def digits(side: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    ims = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((side, side),
                                                          Image.Resampling.BILINEAR))
                    for im in ims])
    return big, d.target.astype(np.int64), [str(c) for c in d.target_names]


PHOTO_BOXES: list[tuple[int, int, int, int]] = []  # (photo, top, left, side) of each crop


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two photo crops (0 for crops of different photos)."""
    if a[0] != b[0]:
        return 0.0
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    iw = max(0, min(a[2] + a[3], b[2] + b[3]) - max(a[2], b[2]))
    return ih * iw / (a[3] ** 2 + b[3] ** 2 - ih * iw)


def photos(side: int, per_class: int = 120,
           max_overlap: float = 1.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Crops of scikit-image's bundled photos; each photo is a class (``PHOTO_BOXES``: where
    each crop came from). ``max_overlap`` < 1: a crop overlapping an earlier crop of its
    photo by more (IoU) is drawn again (up to 200 tries, then left out: that photo gets
    fewer crops), so that distinct samples are not near copies of each other by
    construction."""
    from PIL import Image
    from skimage import data as skd

    PHOTO_BOXES.clear()

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
             "immunohistochemistry", "retina", "camera", "coins", "brick", "grass", "gravel"]
    rng = np.random.default_rng(1)
    ims, labels = [], []
    for c, name in enumerate(names):
        ph = getattr(skd, name)()
        ph = ph if ph.ndim == 3 else np.repeat(ph[..., None], 3, axis=2)
        h, w = ph.shape[:2]
        mine: list[tuple[int, int, int, int]] = []
        for _ in range(per_class):
            for _try in range(200):
                s = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
                top, left = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
                if max_overlap >= 1 or all(overlap((c, top, left, s), b) <= max_overlap
                                           for b in mine):
                    break
            else:  # the photo holds no more crops this far apart: fewer of this class
                continue
            mine.append((c, top, left, s))
            PHOTO_BOXES.append((c, top, left, s))
            ims.append(np.asarray(Image.fromarray(ph[top:top + s, left:left + s, :3])
                                  .resize((side, side), Image.Resampling.BILINEAR)))
            labels.append(c)
    return np.stack(ims), np.asarray(labels, np.int64), names


def run(data: str, side: int, backbone: str, out: Path, seed: int,
        clean: bool = False, max_overlap: float = 1.0) -> dict[str, Any]:
    from pipeline.client.api import submit
    from workers.launcher import local_cluster

    if data == "digits":
        images, labels, names = digits(side)
        ood = planted.photo_crops(10, side, seed)
    else:
        images, labels, names = photos(side, max_overlap=max_overlap)
        ood = digits(side)[0][:10]
    out.mkdir(parents=True, exist_ok=True)
    if clean:  # nothing planted: every finding is a false alarm, or a real flaw of the data
        p = planted.plant(images, labels, len(names), seed, exact=0, near=0, flip_fraction=0)
    else:
        p = planted.plant(images, labels, len(names), seed, exact=20, near=60,
                          flip_fraction=0.03, ood_images=ood)
    path = out / f"{'clean' if clean else 'planted'}-{data}.npz"
    np.savez(path, images=p.images, labels=p.labels, class_names=np.asarray(names))
    spec = JobSpec.from_dict({
        "name": f"planted-{data}", "kind": "quality",
        "data": {"source": "npz", "path": str(path), "shard_size": 512, "seed": seed},
        "backbone": {"name": backbone, "image_size": side},
        "output": str(out / "jobs"), "store": str(out / "store")})
    with local_cluster(out / "cluster", extract_workers=1) as c:
        t0 = time.perf_counter()
        job = submit(spec, broker=c.broker)
        st = job.wait(timeout=3600)
        wall = time.perf_counter() - t0
        if st["status"] != "SUCCESS":
            raise SystemExit(f"job {job.id} {st['status']}: {st.get('error')}")
        section = json.loads((Path(st["report"]).parent / "quality.json").read_text())
    from pipeline.plan import read_plan

    plan = read_plan(Path(st["report"]).parent)
    where = {int(i): n for n in ("train", "val", "test") for i in plan.splits.of(n)}
    scored = planted.score(p, section, where)
    if clean:
        issues, dup = section.get("label_issues", {}), section.get("duplicates", {})
        tests = [i for i, n in where.items() if n == "test"]
        leaked = set(dup.get("leaked", [])) & set(tests)
        scored = {"label_flags": len(issues.get("all", [])),
                  "label_flag_share": round(len(issues.get("all", [])) / len(where), 4),
                  "label_flags_withheld": bool(issues.get("withheld")),
                  "expected_precision": issues.get("expected_precision"),
                  "test_samples": len(tests), "test_called_leaked": len(leaked),
                  "test_leak_share": round(len(leaked) / max(1, len(tests)), 4),
                  "leak_call": dup.get("leak_call"),
                  **(_overlaps(section, tests, where) if data == "photos" else {}),
                  "outliers_flagged": scored["outliers_flagged"]}
    return {"data": data, "clean": clean, "image_size": side, "backbone": backbone,
            "samples": len(p.labels),
            **scored, "oof_top1": section.get("label_issues", {}).get("oof_top1"),
            "thresholds": {k: section["near_duplicate_threshold"].get(k)
                           for k in ("features", "signatures", "aligned", "detail")},
            "expected_copy_recall": section["near_duplicate_threshold"].get(
                "expected_copy_recall"),
            "domain": section.get("pretraining_domain", {}),
            "shift_auc": section.get("shift", {}).get("auc"),
            "stage_seconds": section.get("seconds"), "job_wall_s": round(wall, 1)}


def inside(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """One crop a crop of the other: at least 95 % of the smaller inside the larger, their
    sides within 0.84 of each other (the crop edits the detail signal searches; ``near_copy``
    keeps 0.90-0.96)."""
    if a[0] != b[0]:
        return False
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    iw = max(0, min(a[2] + a[3], b[2] + b[3]) - max(a[2], b[2]))
    return ih * iw >= 0.95 * min(a[3], b[3]) ** 2 and min(a[3], b[3]) >= 0.84 * max(a[3], b[3])


def _overlaps(section: dict[str, Any], tests: list[int],
              where: dict[int, str]) -> dict[str, Any]:
    """Photo crops of one photo can overlap: a test crop whose twin covers the same region
    (IoU >= 0.8, what ``near_copy``'s crop edit keeps) is a near duplicate in fact, not a
    false alarm; so, counted apart, is one that is a crop of its twin (:func:`inside`)."""
    # every leak with its twin: the section's ``leaks`` list is cut to quality.max_listed
    twin = {int(r["index"]): int(r["twin"]) for r in section.get("flagged", [])
            if r["finding"] == "leak"}
    called = [i for i in tests if i in twin]
    real = [i for i in called if overlap(PHOTO_BOXES[i], PHOTO_BOXES[twin[i]]) >= 0.8]
    crop = [i for i in called if i not in real and inside(PHOTO_BOXES[i], PHOTO_BOXES[twin[i]])]
    others = [i for i, n in where.items() if n != "test"]
    present = sum(any(overlap(PHOTO_BOXES[t], PHOTO_BOXES[u]) >= 0.8 for u in others)
                  for t in tests)
    return {"test_leaks_overlapping_their_twin": len(real),
            "test_leak_share_not_overlapping": round((len(called) - len(real))
                                                     / max(1, len(tests)), 4),
            "test_leaks_a_crop_of_their_twin": len(crop),
            "test_leak_share_neither": round((len(called) - len(real) - len(crop))
                                             / max(1, len(tests)), 4),
            "test_crops_with_an_overlapping_crop_elsewhere": present}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits,photos")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--clean", action="store_true",
                    help="plant nothing: measure the false alarms on clean data")
    ap.add_argument("--max-overlap", type=float, default=1.0,
                    help="photo crops: redraw a crop overlapping another of its photo by more "
                         "than this IoU (e.g. 0.5: no natural near copies among the crops)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ff-planted-"))
    results = [run(d, args.image_size, args.backbone, out / d, args.seed, args.clean,
                   args.max_overlap) for d in args.data.split(",")]
    for r in results:
        print(json.dumps(r, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
