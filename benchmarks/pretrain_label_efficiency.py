"""Label efficiency of pretraining, through the product: does an encoder pretrained on the
user's unlabeled images need fewer labels than the off-the-shelf ImageNet one?

Everything runs as jobs on a private Redis + real worker processes, as a user would:
``kind: pretrain`` (labels hidden; the plan's test split is held out and never trained on),
then a ``kind: embed`` job per encoder (``job:<id>``, and the frozen random / ImageNet
encoders) for every image's features. A standardized logistic regression (C=1) is trained on
k labelled training images per class (``--draws`` draws, mean) or on all of them and scored on
the held-out test images. The pretraining report's own "did it help?" answer is printed beside
each row.

Data sets (offline): ``digits`` (sklearn, 8x8 greyscale: far from ImageNet); ``photos``
(crops of 12 scikit-image photos labeled by their photo, written as an image folder with
``train/`` from the left 70 % of each photo and ``test/`` from the right 30 %: close to
ImageNet); ``shapes`` (generated: coloured polygons on noise, unlike either).

Encoders (EfficientNet-Lite0 at ``--size`` px): random init, frozen; ImageNet, frozen;
SimCLR from random init; SimCLR continued from ImageNet; BYOL continued from ImageNet; BYOL
from random init; two BYOL variants (blur + solarize views; slower target, higher rate).

    .venv/bin/python benchmarks/pretrain_label_efficiency.py [--data digits,photos]
        [--epochs 30] [--size 32] [--draws 5] [--encoders all]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.continued_pretraining import probe
from benchmarks.jobs import embeddings, run_job
from workers.launcher import local_cluster

PHOTOS = ["astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "immunohistochemistry", "moon", "rocket", "hubble_deep_field"]
BUDGETS: list[int | None] = [1, 5, 10, 50, None]


def write_photos(root: Path, per_photo: int = 150, side: int = 64) -> dict[str, Any]:
    """Crops of 48-128 px resized to ``side``, one class per photo; train crops from the left
    70 % of each photo, test crops from the right 30 % (no test pixel is trained on)."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        photo = photo[..., :3].astype(np.uint8)
        h, w = photo.shape[:2]
        cut = int(w * 0.7)
        for i in range(per_photo):
            test = i >= int(per_photo * 0.7)
            lo, hi = (cut, w) if test else (0, cut)
            s = int(rng.integers(48, min(128, h, hi - lo) + 1))
            y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(lo, hi - s + 1))
            d = root / ("test" if test else "train") / name
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y0:y0 + s, x0:x0 + s]).resize(
                (side, side), Image.Resampling.BILINEAR).save(d / f"{i:03d}.png")
    return {"source": "imagefolder", "path": str(root), "shard_size": 600}


def write_shapes(root: Path, per_class: int = 150, side: int = 48) -> dict[str, Any]:
    """Generated images unlike photos or digits: one of 6 filled polygons (3-8 corners),
    random colour, size, rotation and place, on coloured noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1)
    for corners in range(3, 9):
        for i in range(per_class):
            test = i >= int(per_class * 0.7)
            bg = (rng.integers(0, 256, 3) * 0.5 + rng.integers(0, 128, (side, side, 3)) * 0.5)
            im = Image.fromarray(bg.astype(np.uint8))
            r = rng.uniform(0.2, 0.42) * side
            cx, cy = rng.uniform(r, side - r, 2)
            a0 = rng.uniform(0, 2 * np.pi)
            pts = [(cx + r * np.cos(a0 + 2 * np.pi * k / corners),
                    cy + r * np.sin(a0 + 2 * np.pi * k / corners)) for k in range(corners)]
            ImageDraw.Draw(im).polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            d = root / ("test" if test else "train") / f"{corners}-gon"
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i:03d}.png")
    return {"source": "imagefolder", "path": str(root), "shard_size": 600}


def encoders(size: int, epochs: int | str
             ) -> dict[str, tuple[dict[str, Any] | None, dict[str, Any]]]:
    """label -> (pretrain section or None for a frozen encoder, backbone section)."""
    lite = {"name": "efficientnet_lite0", "image_size": size}
    scratch = {**lite, "weights": "random"}
    common = {"epochs": epochs, "batch_size": 128, "hflip": False,
              "eval_every_epochs": epochs if isinstance(epochs, int) else 10_000}
    return {
        "random init, frozen": (None, scratch),
        "ImageNet, frozen": (None, lite),
        "SimCLR from random init": ({**common, "method": "simclr"}, scratch),
        "SimCLR continued from ImageNet": ({**common, "method": "simclr"}, lite),
        "BYOL continued from ImageNet": ({**common, "method": "byol"}, lite),
        "BYOL from random init": ({**common, "method": "byol"}, scratch),
        "BYOL continued from ImageNet, blur + solarize": (
            {**common, "method": "byol", "blur": 0.5, "solarize": 0.2}, lite),
        "BYOL continued from ImageNet, momentum 0.996, lr 3e-3": (
            {**common, "method": "byol", "momentum": 0.996, "lr": 3e-3}, lite),
    }


def bench(name: str, data: dict[str, Any], out: Path, broker: str, args: Any) -> dict[str, Any]:
    base = {"data": data, "output": str(out / "jobs"), "store": str(out / "store")}
    chosen = encoders(args.size, args.epochs)
    wanted = list(chosen) if args.encoders == "all" else [
        e for e in chosen if any(w.strip().lower() == e.lower()
                                 for w in args.encoders.split("|"))]
    split: dict[str, np.ndarray] = {}
    labels = np.zeros(0, np.int64)
    rows: dict[str, dict[str, Any]] = {}
    for label in wanted:
        pre, backbone = chosen[label]
        row: dict[str, Any] = {}
        t0 = time.perf_counter()
        if pre is not None:
            st, rep = run_job({**base, "name": f"{name}-pretrain", "kind": "pretrain",
                               "backbone": backbone, "pretrain": pre}, broker)
            row["pretrain_s"] = round(time.perf_counter() - t0, 1)
            row["final_loss"] = rep["train"]["history"][-1]["loss"]
            row["did_it_help"] = (rep.get("did_it_help") or {}).get("summary")
            backbone = {"name": f"job:{rep['job_id']}"}
        st, rep = run_job({**base, "name": f"{name}-embed", "kind": "embed",
                           "backbone": backbone}, broker)
        plan = json.loads((Path(st["job_dir"]) / "plan.json").read_text())
        if not split:  # the splits a pretraining (classify) plan makes of this data
            from pipeline.planner import make_plan
            from pipeline.spec import JobSpec

            p = make_plan(JobSpec.from_dict({**base, "kind": "pretrain",
                                             "backbone": chosen[label][1]}), "0" * 12)
            split = {k: np.asarray(getattr(p.splits, k)) for k in ("train", "val", "test")}
            from pipeline.sources import open_source

            labels = np.asarray(open_source(p.spec.data).labels)
        x = embeddings(Path(st["job_dir"]))
        assert len(x) == plan["n_samples"] == len(labels)
        rows[label] = {"x": x, **row}
    train = np.concatenate([split["train"], split["val"]])
    test = split["test"]
    result: dict[str, Any] = {"train": len(train), "test": len(test), "encoders": {}}
    print(f"\n### {name}: {len(train)} training images (pretraining and labels), {len(test)} "
          f"test, EfficientNet-Lite0 at {args.size} px, {args.epochs} pretraining epochs\n")
    print("| encoder | 1 / 5 / 10 / 50 labels per class | all labels | pretraining s |"
          "\n|---|---|---|---|")
    for label, r in rows.items():
        cells = {str(k or "all"): probe(r["x"], labels, train, test, k, args.draws)
                 for k in BUDGETS}
        result["encoders"][label] = {**cells, **{k: v for k, v in r.items() if k != "x"}}
        few = " / ".join(f"{cells[str(k)][0]:.3f}" for k in BUDGETS[:-1])
        print(f"| {label} | {few} | {cells['all'][0]:.3f} | {r.get('pretrain_s', '-')} |")
    for label, r in rows.items():
        if r.get("did_it_help"):
            print(f"- {label}: the report's \"did it help?\": {r['did_it_help']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="digits,photos")
    ap.add_argument("--epochs", type=lambda v: v if v == "auto" else int(v), default=30,
                    help="pretraining epochs, or auto (the product's default: from the data "
                         "size)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--encoders", default="all",
                    help="encoder labels separated by |, e.g. 'ImageNet, frozen|BYOL from "
                         "random init'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ff-label-eff-"))
    makers = {"digits": lambda: {"source": "digits", "shard_size": 600},
              "photos": lambda: write_photos(out / "photos"),
              "shapes": lambda: write_shapes(out / "shapes")}
    results: dict[str, Any] = {"size": args.size, "epochs": args.epochs, "draws": args.draws}
    with local_cluster(out / "cluster", extract_workers=1) as c:
        for name in args.data.split(","):
            results[name] = bench(name, makers[name](), out / name, c.broker, args)
            (out / "label_efficiency.json").write_text(json.dumps(results, indent=2))
    print(f"\n{out / 'label_efficiency.json'}")


if __name__ == "__main__":
    main()
