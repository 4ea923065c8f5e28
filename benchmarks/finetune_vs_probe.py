"""Fine-tuning vs the linear probe on digits (EfficientNet-Lite0, ImageNet weights), same splits.

Runs one `featurefleet compare` with both strategies on a private Redis + real workers and
prints the leaderboard and the wall time. CPU budget: 64 px, 5 fine-tuning epochs.

    .venv/bin/python benchmarks/finetune_vs_probe.py [--image-size 64] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.client.compare import compare
from pipeline.client.console import format_leaderboard
from pipeline.spec import BackboneSpec, DataSpec, FinetuneSpec, JobSpec
from workers.launcher import local_cluster


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="ff-ft-bench-"))
    spec = JobSpec(name="ft-vs-probe", data=DataSpec(source="digits"),
                   backbone=BackboneSpec(image_size=args.image_size),
                   finetune=FinetuneSpec(epochs=args.epochs, hflip=False),
                   output=str(out))
    t0 = time.time()
    with local_cluster(out / "cluster", extract_workers=1) as c:
        board = compare(spec, ["efficientnet_lite0"], ["probe", "finetune"],
                        broker=c.broker).wait(timeout=3600)
    wall = time.time() - t0
    print(format_leaderboard(board))
    rows = {r["strategy"]: r for r in board["rows"]}
    result = {"image_size": args.image_size, "epochs": args.epochs, "wall_s": round(wall, 1),
              "probe_test_top1": rows["probe"]["test_top1"],
              "finetune_test_top1": rows["finetune"]["test_top1"],
              "finetune_train_s": rows["finetune"]["train_s"],
              "probe_train_s": rows["probe"]["train_s"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
