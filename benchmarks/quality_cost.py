"""What the data-quality stage costs a job, measured the way #24 states its target.

Runs the demo's job (sklearn digits, all 1,797 images, EfficientNet-Lite0 at ``--image-size``)
on a private Redis + real workers three times:

1. with the quality stage, on an empty store (the first run a user sees);
2. the same job again (features and the stage's result come from the store);
3. without the stage (``quality.enabled: false``), on another empty store.

A small warm-up job runs first, so that no measured job pays for the workers' start-up (the
backbone loaded in each worker): without it the first job measured is also the slowest for
reasons that have nothing to do with the stage.

and prints each job's wall time (submit to SUCCESS), the stage's own seconds and parts, and
the two ratios of the target: the stage's share of a first run (target ≤ 20 %) and the cached
rerun against the first job (target ≤ 0.2x).

    .venv/bin/python benchmarks/quality_cost.py [--image-size 224] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline import submit
from pipeline.spec import JobSpec
from workers.launcher import local_cluster


def run(spec: JobSpec, broker: str) -> tuple[float, dict[str, Any]]:
    from pipeline.jobs.broker import connect
    from pipeline.jobs.records import JobStore

    t = time.time()
    job = submit(spec, broker=broker)
    st = job.wait(timeout=7200)
    assert st["status"] == "SUCCESS", st.get("error")
    wall = time.time() - t
    parts = JobStore(connect(broker)).parts(job.id, "quality")
    by_kind: dict[str, list[float]] = {}
    for name, p in parts.items():
        by_kind.setdefault(name.split(".")[0], []).append(float(p.get("seconds", 0)))
    if by_kind:  # where the stage's task-seconds go
        print("  quality parts: " + ", ".join(
            f"{k} {sum(v):.1f} s ({len(v)})" for k, v in sorted(by_kind.items())), flush=True)
    return wall, job.result()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="ff-quality-cost-"))

    def spec(store: str, quality: bool) -> JobSpec:
        return JobSpec.from_dict({
            "name": "quality-cost", "data": {"source": "digits", "limit": args.limit},
            "backbone": {"name": "efficientnet_lite0", "image_size": args.image_size},
            "quality": {"enabled": quality}, "output": str(out / "runs"),
            "store": str(out / store)})

    labels = ("first run, with the stage", "same job again (cached)",
              "first run, without the stage")
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    with local_cluster(out / "cluster", extract_workers=args.workers) as c:
        # warm-up (own store, 64 images): every measured job finds workers with the backbone
        # loaded, so the first measured job does not also pay for starting them
        warm = spec("store-warm", True).model_dump()
        warm["data"]["limit"] = 64
        run(JobSpec.from_dict(warm), c.broker)
        for r in range(args.repeats):  # with and without alternate: drift hits both
            for label, s in zip(labels, (spec(f"store-a{r}", True), spec(f"store-a{r}", True),
                                         spec(f"store-b{r}", False)), strict=True):
                wall, rep = run(s, c.broker)
                t = rep["timings"]
                runs[label].append({"wall_s": round(wall, 1), "extract_s": t.get("extract_s"),
                                    "quality_s": t.get("quality_s"),
                                    "quality_reused": t.get("quality_reused"),
                                    "top1": round(rep["metrics"]["top1"], 4)})
                print(f"{label}: {wall:.1f} s", flush=True)
    rows = {label: {k: statistics.median(float(x[k] or 0) for x in v)
                    for k in ("wall_s", "extract_s", "quality_s")} for label, v in runs.items()}
    first = rows["first run, with the stage"]["wall_s"]
    bare = rows["first run, without the stage"]["wall_s"]
    again = rows["same job again (cached)"]["wall_s"]
    print(f"\ndigits ({args.limit or 1797} images) at {args.image_size} px, "
          f"{args.workers} extraction worker(s), median of {args.repeats} run(s)")
    print(f"{'job':32} {'wall s':>8} {'extract s':>10} {'quality s':>10}")
    for label, r in rows.items():
        print(f"{label:32} {r['wall_s']:8.1f} {r['extract_s']:10.1f} {r['quality_s']:10.1f}")
    added = (first - bare) / bare
    print(f"the stage adds {added:.0%} to a first run (target <= 20%); the cached rerun takes "
          f"{again / first:.2f}x the first job (target <= 0.2x)")
    print(json.dumps({"image_size": args.image_size, "rows": rows, "stage_adds": round(added, 3),
                      "rerun_ratio": round(again / first, 3), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
