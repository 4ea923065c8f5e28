"""Pretraining throughput: featurefleet's pretraining program (``pipeline.pretrain.train.run``)
in every rank torchrun starts (DDP: NCCL on GPU with bf16 autocast, gloo on CPU), on sklearn's
digits repeated to ``--images`` samples. Prints images/s per epoch and the loss (rank 0).

    torchrun --standalone --nproc_per_node=N benchmarks/pretrain_throughput.py \\
        --arch resnet18 --image-size 224 --batch-size 512 --epochs 2 [--json out.json]
    .venv/bin/python benchmarks/pretrain_throughput.py --image-size 32 --images 512  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from pipeline.backbones import resolve_weights
from pipeline.engine import dist
from pipeline.engine.loop import Slice
from pipeline.pretrain.train import Data, Encoder, run
from pipeline.sources.arrays import ArraySource
from pipeline.spec import PretrainSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--method", default="simclr", choices=["simclr", "byol", "autoencoder"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=512, help="global, split across ranks")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=20480)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    d = load_digits()
    src = ArraySource(np.round(d.images * 255 / 16).astype(np.uint8),
                      d.target.astype(np.int64), [str(c) for c in d.target_names])
    train = [i % len(src.labels) for i in range(args.images)]
    pre = resolve_weights(args.arch, "random").preprocessing.scaled_to(args.image_size)
    cfg = PretrainSpec(method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                       hflip=False, eval_every_epochs=0)
    rank = dist.init("auto")
    out = Path(args.out or tempfile.mkdtemp(prefix="ff-pretrain-bench-"))
    t0 = time.time()
    summary = run(rank, Data(src, train), cfg, Encoder(args.arch, "random", pre, seed=0),
                  Slice(out))
    result = {"arch": args.arch, "method": args.method, "image_size": args.image_size,
              "batch_size": args.batch_size, "world_size": rank.world_size,
              "device": rank.device, "wall_s": round(time.time() - t0, 1),
              "epochs": summary["history"]}
    if rank.is_main:
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    dist.finish()


if __name__ == "__main__":
    main()
