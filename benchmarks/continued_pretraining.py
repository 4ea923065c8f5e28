"""Continued (domain-adaptive) pretraining: does SimCLR on the user's own unlabeled images,
starting from ImageNet weights, beat the frozen ImageNet encoder — and at which learning rate?

All through the product on a private Redis + real worker processes: ``kind: pretrain`` jobs on
sklearn's digits (the training split only: the pretraining plan's test split is held out),
then a ``kind: embed`` job per encoder (``job:<id>``, and the ImageNet encoder itself) for the
features of every digit; a standardized logistic regression (C=1) is trained on k labelled
training digits per class (10 draws) or on all of them and scored on the held-out test split.

Encoders (EfficientNet-Lite0 at ``--size`` px): ImageNet frozen; continued SimCLR at 1e-4 (a
tenth of the default, the usual advice for adapting pretrained weights) and at the default
1e-3; SimCLR from random initialisation (1e-3).

    .venv/bin/python benchmarks/continued_pretraining.py [--epochs 15] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.jobs import embeddings, run_job
from workers.launcher import local_cluster


def probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
          k: int | None, draws: int) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    for d in range(1 if k is None else draws):
        rng = np.random.default_rng(d)
        pick = train if k is None else np.concatenate(
            [rng.choice(train[y[train] == c], k, replace=False) for c in np.unique(y)])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
        clf.fit(x[pick], y[pick])
        scores.append(float((clf.predict(x[test]) == y[test]).mean()))
    return round(float(np.mean(scores)), 4), round(float(np.std(scores)), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ff-continued-"))
    base = {"data": {"source": "digits", "shard_size": 600}, "output": str(out / "jobs"),
            "store": str(out / "store")}
    pretrain = {"method": "simclr", "epochs": args.epochs, "batch_size": 128, "hflip": False,
                "eval_every_epochs": 0}
    encoders: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
        ("ImageNet, frozen", None, {"name": "efficientnet_lite0", "image_size": args.size}),
        ("ImageNet + SimCLR, lr 1e-4", {**pretrain, "lr": 1e-4},
         {"name": "efficientnet_lite0", "image_size": args.size}),
        ("ImageNet + SimCLR, lr 1e-3 (default)", {**pretrain, "lr": 1e-3},
         {"name": "efficientnet_lite0", "image_size": args.size}),
        ("random + SimCLR, lr 1e-3", {**pretrain},
         {"name": "efficientnet_lite0", "weights": "random", "image_size": args.size}),
    ]
    rows: dict[str, Any] = {}
    split: dict[str, np.ndarray] = {}
    with local_cluster(out / "cluster", extract_workers=1) as c:
        for label, pre, backbone in encoders:
            t0 = time.perf_counter()
            row: dict[str, Any] = {}
            if pre is not None:
                st, rep = run_job({**base, "name": f"pretrain-{len(rows)}",
                                   "kind": "pretrain", "backbone": backbone, "pretrain": pre},
                                  c.broker)
                plan = json.loads((Path(st["job_dir"]) / "plan.json").read_text())
                split = {k: np.asarray(plan["splits"][k]) for k in ("train", "val", "test")}
                row["pretrain_s"] = round(time.perf_counter() - t0, 1)
                row["lr"] = plan["spec"]["pretrain"]["lr"]
                row["final_loss"] = rep["train"]["history"][-1]["loss"]
                backbone = {"name": f"job:{rep['job_id']}"}
            st, rep = run_job({**base, "name": f"embed-{len(rows)}", "kind": "embed",
                               "backbone": backbone}, c.broker)
            x = embeddings(st["job_dir"])
            rows[label] = {"x": x, **row}
    from sklearn.datasets import load_digits

    y = load_digits().target
    train = np.concatenate([split["train"], split["val"]])
    test = split["test"]
    result: dict[str, Any] = {"train": len(train), "test": len(test), "epochs": args.epochs,
                              "size": args.size, "encoders": {}}
    print(f"\n| encoder (Lite0, {args.size} px) | 1 / 5 / 10 labels per class | all labels | "
          "pretraining s |\n|---|---|---|---|")
    for label, r in rows.items():
        cells = {str(k): probe(r["x"], y, train, test, k, args.draws) for k in (1, 5, 10)}
        cells["all"] = probe(r["x"], y, train, test, None, 1)
        result["encoders"][label] = {**cells, **{k: v for k, v in r.items() if k != "x"}}
        few = " / ".join(f"{cells[k][0]:.3f}" for k in ("1", "5", "10"))
        print(f"| {label} | {few} | {cells['all'][0]:.3f} | {r.get('pretrain_s', '-')} |")
    (out / "continued.json").write_text(json.dumps(result, indent=2))
    print(f"\ntrain {len(train)} (pretraining and labels), test {len(test)}; {out}")


if __name__ == "__main__":
    main()
