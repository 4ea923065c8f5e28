"""Can one Redis coordinate a large fleet? Simulated extraction workers against one Redis.

Each simulated GPU is a thread of a real Celery worker process (``-P threads``) running the
real extraction task with the network replaced by a sleep of ``--shard-s`` seconds
(``benchmarks/simworker.py``): plan reference checks, decoding, the HDF5 shard write, the
Lua-scripted records, progress and cancel checks all run. A job of ``--shards`` shards (one
tiny image each, so everything but the modelled GPU time is the coordination cost) goes
through the real canvas: ``chord(extract_shard ...) -> collect -> train -> evaluate``.

Printed per job size: shard tasks per second sustained (first start to last finish), Redis
commands and Redis CPU per shard task (``INFO commandstats`` / ``INFO cpu`` deltas over the
job), the chord's tail (last shard finished -> job SUCCESS), and what one Redis could
coordinate: the shard tasks per second at which Redis's single thread would be busy, and
that as a fleet of GPUs at ``--gpu-img-s`` with ``--shard-images``-image shards.

    python benchmarks/coordinator_sim.py --shards 1000,3000,10000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def redis_stats(url: str) -> tuple[dict[str, int], float]:
    """(calls per command, Redis CPU seconds user+sys)."""
    import redis

    r = redis.Redis.from_url(url)
    info = r.info("all")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()
             if k.startswith("cmdstat_") and isinstance(v, dict)}
    r.close()
    return calls, float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_job(url: str, out: Path, shards: int) -> dict[str, Any]:
    from pipeline.client.api import submit
    from pipeline.spec import JobSpec

    rng = np.random.default_rng(shards)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"tiny-{shards}.npz"
    images = rng.integers(0, 255, (shards, 8, 8), dtype=np.uint8)  # distinct: no duplicates
    np.savez(data, images=images, labels=np.arange(shards) % 10)
    spec = JobSpec.from_dict({
        "name": f"sim-{shards}", "data": {"source": "npz", "path": str(data), "shard_size": 1,
                                          "max_skipped_fraction": 0.0},
        "backbone": {"name": "efficientnet_lite0", "image_size": 16, "batch_size": 8},
        "probe": {"l2": 1e-3, "heads": ["linear"]}, "quality": {"enabled": False},
        "output": str(out / "jobs"), "store": str(out / "store")})
    calls0, cpu0 = redis_stats(url)
    t0 = time.time()
    job = submit(spec, broker=url)
    t_submitted = time.time()
    st = job.wait(timeout=3600)
    t_done = time.time()
    calls1, cpu1 = redis_stats(url)
    if st["status"] != "SUCCESS":
        raise SystemExit(f"job {job.id} {st['status']}: {st.get('error')}")
    rep = job.result()
    rows = [s for s in rep["shards"] if not s.get("cached")]
    first = min(float(s["started_at"]) for s in rows)
    last = max(float(s["finished_at"]) for s in rows)
    return {"shards": shards, "submit_s": round(t_submitted - t0, 2),
            "extract_window_s": round(last - first, 2),
            "tasks_per_s": round(len(rows) / max(1e-9, last - first), 1),
            "tail_after_last_shard_s": round(t_done - last, 2),
            "job_wall_s": round(t_done - t0, 2),
            "redis_commands_per_task": round(
                (sum(calls1.values()) - sum(calls0.values())) / shards, 1),
            "top_commands_per_task": dict(sorted(
                ((k, round((v - calls0.get(k, 0)) / shards, 2)) for k, v in calls1.items()),
                key=lambda kv: -kv[1])[:8]),
            "redis_cpu_ms_per_task": round((cpu1 - cpu0) * 1000 / shards, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="1000,3000,10000")
    ap.add_argument("--processes", type=int, default=4, help="simulated worker processes")
    ap.add_argument("--threads", type=int, default=16, help="simulated GPUs per process")
    ap.add_argument("--shard-s", type=float, default=0.137,
                    help="modelled GPU seconds per shard (2048 images at 15,000 img/s)")
    ap.add_argument("--gpu-img-s", type=float, default=15000.0)
    ap.add_argument("--shard-images", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from workers.launcher import (
        BROKER_ENV,
        CLUSTER_ENV,
        WORKER_ENV,
        spawn,
        start_redis,
        start_worker,
        wait_for_workers,
        worker_argv,
    )

    with tempfile.TemporaryDirectory(prefix="ff-coord-") as tmp:
        work = Path(tmp)
        server = start_redis(work / "redis")
        procs, names = [], []
        try:
            env = {**os.environ, **WORKER_ENV, BROKER_ENV: server.url,
                   CLUSTER_ENV: str(work / "logs"), "SIM_SHARD_S": str(args.shard_s),
                   "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            (work / "logs").mkdir()
            for p in range(args.processes):
                name = f"sim{p}@bench"
                procs.append(spawn(name, worker_argv(["ff.extract"], args.threads, name,
                                                     pool="threads", loglevel="WARNING",
                                                     include=["benchmarks.simworker"]),
                                   work / "logs" / f"{name}.log", env))
                names.append(name)
            procs.append(start_worker(server.url, ["ff.train"], "train@bench", work / "logs",
                                      loglevel="WARNING"))
            names.append("train@bench")
            wait_for_workers(server.url, names, procs, timeout=180)
            results = []
            for n in (int(s) for s in args.shards.split(",")):
                r = run_job(server.url, work / f"job-{n}", n)
                results.append(r)
                print(json.dumps(r), flush=True)
        finally:
            for p in procs:
                p.stop()
            server.stop()
    per_gpu = args.gpu_img_s / args.shard_images  # shard tasks per second one GPU asks for
    worst = max(r["redis_cpu_ms_per_task"] for r in results)
    capacity = 1000.0 / worst if worst > 0 else float("inf")
    print(f"\nsimulated fleet: {args.processes} x {args.threads} GPUs at {args.shard_s} s/shard "
          f"(ideal {args.processes * args.threads / args.shard_s:.0f} tasks/s)")
    print("| shards | tasks/s sustained | Redis commands/task | Redis CPU ms/task | tail after "
          "last shard (s) | job wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shards']} | {r['tasks_per_s']} | {r['redis_commands_per_task']} | "
              f"{r['redis_cpu_ms_per_task']} | {r['tail_after_last_shard_s']} | "
              f"{r['job_wall_s']} |")
    print(f"\none Redis thread saturates at ~{capacity:.0f} shard tasks/s (worst CPU/task); a GPU "
          f"at {args.gpu_img_s:.0f} img/s with {args.shard_images}-image shards asks for "
          f"{per_gpu:.1f}/s: ~{capacity / per_gpu:.0f} GPUs at 100% Redis CPU, "
          f"~{capacity / per_gpu / 2:.0f} at 50%")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
