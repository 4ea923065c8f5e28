"""Benchmarks: the pipeline against the bare model and a tutorial-style PyTorch loop.

Same model, batch size, threads and device for every row:

1. bare forward: random tensors already in memory (channels_last, inference mode);
2. pipeline: an image folder through Celery + Redis + HDF5 with one extraction worker;
3. plain loop: torchvision Resize/ToTensor/Normalize in a DataLoader, NCHW fp32, ``no_grad``;
4. dispatch overhead: enqueue -> start -> result stored, for an extraction task with no work;
5. HDF5 write MB/s for the feature shape of the model.

Run ``featurefleet bench`` (or ``python benchmarks/bench.py``); it prints a table and JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from workers.launcher import ALLOCATOR_ENV


def _ensure_allocator_env(argv: list[str]) -> None:
    """Re-exec with the workers' allocator settings, so every row runs under the same ones."""
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.environ.update(ALLOCATOR_ENV)
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.harness", *argv])


def make_image_folder(root: Path, n: int, size: int = 32) -> Path:
    """sklearn digits upsampled to ``size`` px and saved as JPEG files, class per folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(n):
        img = np.round(d.images[i % len(d.images)] * 255 / 16).astype(np.uint8)
        folder = root / str(d.target[i % len(d.target)])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").resize((size, size), Image.BILINEAR).save(
            folder / f"{i:05d}.jpg", quality=95)
    return root


def bench_bare(model_name: str, batch: int, crop: int, seconds: float, device: str = "cpu",
               precision: str = "bf16", use_compile: bool = False,
               weights: str = "DEFAULT") -> float:
    import torch

    from pipeline.devices import autocast_dtype, cached_backbone

    bb = cached_backbone(model_name, weights, device, use_compile)
    amp = autocast_dtype(device, precision)
    x = torch.randn(batch, 3, crop, crop, device=device).contiguous(
        memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            bb.model(x).float().cpu()  # the pipeline also brings features back to the host

    with torch.inference_mode():
        for _ in range(3):  # warm-up (cuDNN autotuning, compilation)
            step()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            n += batch
    return n / (time.perf_counter() - t0)


def plain_loop_subprocess(model_name: str, folder: Path, batch: int, crop: int,
                          workers: int, device: str = "cpu", weights: str = "DEFAULT") -> float:
    """The tutorial loop as its user runs it: a fresh process with the default environment
    (none of the workers' allocator settings)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    code = ("import sys; from benchmarks.harness import bench_plain_loop as f; from pathlib import "
            f"Path; print(f({model_name!r}, Path({str(folder)!r}), {batch}, {crop}, {workers}, "
            f"{device!r}, {weights!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=str(Path(__file__).resolve().parent.parent))
    return float(out.stdout.strip().splitlines()[-1])


def bench_plain_loop(model_name: str, folder: Path, batch: int, crop: int,
                     workers: int, device: str = "cpu", weights: str = "DEFAULT") -> float:
    """What a tutorial does: ImageFolder + Resize/ToTensor/Normalize + DataLoader, NCHW fp32."""
    import torch
    from torchvision import datasets, transforms

    from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD, load_backbone

    model = load_backbone(model_name, weights, device).model
    tf = transforms.Compose([transforms.Resize((crop, crop)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf),
                                         batch_size=batch, num_workers=workers)
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _y in loader:
            feats.append(model(x.to(device)).cpu())
    n = sum(len(f) for f in feats)
    return n / (time.perf_counter() - t0)


def bench_pipeline(folder: Path, workdir: Path, model_name: str, batch: int, crop: int,
                   shard_size: int, device: str = "cpu", precision: str = "bf16",
                   use_compile: bool = False, weights: str = "DEFAULT", rounds: int = 5,
                   bare_seconds: float = 4.0, decode: str = "auto") -> dict[str, Any]:
    """One extraction worker; ``rounds`` measured jobs, each between two bare-forward runs.

    A job's throughput is counted from submit until every shard is stored. This machine's speed
    drifts by 10-20% within a minute, so each job is compared with the bare forward measured
    just before and just after it (the cluster idle meanwhile, as the plain loop would find the
    machine), and the ratio reported is the median over rounds.
    """
    from pipeline.client.api import submit
    from pipeline.spec import BackboneSpec, DataSpec, JobSpec
    from workers.launcher import local_cluster

    def bare() -> float:
        return bench_bare(model_name, batch, crop, bare_seconds, device, precision,
                          use_compile, weights)

    with local_cluster(workdir / "cluster", extract_workers=1) as cluster:
        spec = JobSpec(name="bench", data=DataSpec(source="imagefolder", path=str(folder),
                                                   test_fraction=0.5, shard_size=shard_size),
                       backbone=BackboneSpec(name=model_name, batch_size=batch,
                                             image_size=crop, device=device, weights=weights,
                                             precision=precision, compile=use_compile,
                                             decode=decode),
                       output=str(workdir / "out"))
        # Warm-up job (model load, first-call costs), then the measured jobs on fresh stores.
        warm = submit(spec.replace(data={"limit": batch * 2}), broker=cluster.broker)
        warm.wait(timeout=600)
        bares, jobs = [bare()], []
        for r in range(rounds):
            jobs.append(_timed_job(spec.replace(store=str(workdir / f"store-{r}")),
                                   cluster.broker))
            bares.append(bare())
        dispatch = bench_dispatch(cluster.broker, jobs[-1]["report"])
    ratios = [j["images_per_s"] / ((bares[i] + bares[i + 1]) / 2) for i, j in enumerate(jobs)]
    rep = jobs[-1]["report"]
    return {"images": jobs[-1]["images"], "rounds": rounds,
            "images_per_s": statistics.median(j["images_per_s"] for j in jobs),
            "bare_images_per_s": statistics.median(bares),
            "over_bare": statistics.median(ratios),
            "per_round": [{"pipeline_img_s": round(j["images_per_s"], 2),
                           "wall_s": round(j["wall_s"], 3),
                           "task_s": j["report"]["timings"]["extract_task_s"],
                           "model_and_preprocess_s": j["report"]["timings"]["extract_model_s"],
                           "bare_around_img_s": [round(bares[i], 2), round(bares[i + 1], 2)],
                           "ratio": round(ratios[i], 3)} for i, j in enumerate(jobs)],
            "top1": rep["metrics"]["top1"], "status": "SUCCESS",
            "workers": sorted({s["worker"] for s in rep["shards"]}), "dispatch": dispatch}


def _timed_job(spec: Any, broker: str) -> dict[str, Any]:
    """Submit ``spec`` and time it from submit until the chord callback saw every shard
    stored, from the timestamps the tasks write; the client polls slowly so that it does not
    take CPU from the worker it is measuring."""
    from pipeline.client.api import submit

    t0 = time.time()
    job = submit(spec, broker=broker)
    final = job.wait(timeout=600, poll=0.5)
    if final["status"] != "SUCCESS":
        raise RuntimeError(final.get("error"))
    wall = float(final["extract_finished"]) - t0
    rep = job.result()
    images = sum(s["rows"] for s in rep["shards"])
    return {"images": images, "wall_s": wall, "images_per_s": images / wall, "report": rep}


def bench_dispatch(broker: str, rep: dict[str, Any], n: int = 100) -> dict[str, float]:
    """Shard tasks with no work (they belong to a finished job: the task checks the plan
    reference, reads the job record and returns the shard's recorded result; no model, no
    file), sent as ``job_canvas`` sends them: one at a time (enqueue -> start -> result
    stored, the latency a single shard pays) and as a burst of ``n`` (wall / n: the overhead
    per shard when a job's shards queue up)."""
    from pipeline.jobs.broker import connect
    from pipeline.jobs.records import JobStore
    from workers.app import make_app
    from workers.canvas import signature
    from workers.settings import EXTRACT_QUEUE

    record = JobStore(connect(broker)).get(rep["job_id"])
    ref, shard = record["plan"], rep["shards"][0]["id"]
    app = make_app(broker)

    def task(i: int) -> Any:  # as job_canvas builds a shard's task
        return signature(app, rep["job_id"], "extract_shard", ref, shard,
                         tid=f"bench-dispatch.{i}", queue=EXTRACT_QUEUE)

    times = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            res = task(i).apply_async()
            res.get(timeout=30)
            times.append((time.perf_counter() - t0) * 1000)
            res.forget()
        t0 = time.perf_counter()
        results = [task(n + i).apply_async() for i in range(n)]
        for res in results:
            res.get(timeout=60)
        burst = (time.perf_counter() - t0) * 1000 / n
    finally:
        app.close()
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "p90_ms": float(np.percentile(times, 90)), "burst_per_task_ms": burst}


def bench_hdf5(workdir: Path, dim: int, rows: int = 512, shards: int = 40) -> float:
    from pipeline.store import shards as store

    feats = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float16)
    data = store.ShardData(feats, np.zeros(rows, np.int64), np.arange(rows),
                           [str(i) for i in range(rows)], [], {"key": "bench"})
    t0 = time.perf_counter()
    for i in range(shards):
        store.write_shard(workdir / "h5" / f"{i}.h5", data)
    return feats.nbytes * shards / (time.perf_counter() - t0) / 1e6


def run(model_name: str = "efficientnet_lite0", batch: int = 32, crop: int = 224,
        images: int = 1024, shard_size: int = 256, seconds: float = 4.0, rounds: int = 5,
        loader_workers: int = 2, device: str = "cpu", precision: str = "bf16",
        use_compile: bool = False, weights: str = "DEFAULT",
        gflops_per_image: float | None = None, peak_tflops: float | None = None,
        data: str = "digits", photo_size: str = "500x375",
        decode: str = "auto") -> dict[str, Any]:
    import torch

    gpu = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="ff-bench-") as tmp:
        work = Path(tmp)
        if data == "photos":  # real-photo JPEGs: decoding is a real share of the cost
            from benchmarks.photos import make_photo_folder, parse_size

            keep = os.environ.get("FEATUREFLEET_BENCH_PHOTOS")  # reuse generated photos
            folder = Path(keep) / f"{photo_size}-{images}" if keep else work / "images"
            done = folder.parent / f".{folder.name}.done"  # beside it: not a class folder
            if not done.is_file():
                make_photo_folder(folder, images, parse_size(photo_size))
                done.touch()
        else:
            folder = make_image_folder(work / "images", images)
        pipe = bench_pipeline(folder, work, model_name, batch, crop, shard_size, device,
                              precision, use_compile, weights, rounds, seconds, decode)
        bare = pipe["bare_images_per_s"]
        plain = plain_loop_subprocess(model_name, folder, batch, crop, loader_workers, device,
                                      weights)
        plain_tuned = bench_plain_loop(model_name, folder, batch, crop, loader_workers, device,
                                       weights)
        from pipeline.devices import cached_backbone

        h5 = bench_hdf5(work, cached_backbone(model_name, weights, device).feature_dim)
    mfu = {}
    if gflops_per_image and peak_tflops:
        mfu = {"gflops_per_image": gflops_per_image, "peak_tflops": peak_tflops,
               "mfu_bare": round(bare * gflops_per_image / (peak_tflops * 1e3), 4),
               "mfu_pipeline": round(pipe["images_per_s"] * gflops_per_image
                                     / (peak_tflops * 1e3), 4)}
    return {
        "data": data if data != "photos" else f"photos {photo_size}",
        "model": model_name, "weights": weights, "batch": batch, "crop": crop, "decode": decode,
        "images": images, "threads": torch.get_num_threads(), "device": device,
        "precision": precision if gpu else "fp32", "compiled": use_compile, **mfu,
        "bare_forward_img_s": round(bare, 2),
        "pipeline_img_s": round(pipe["images_per_s"], 2),
        "plain_loop_img_s": round(plain, 2),
        "plain_loop_with_worker_allocator_img_s": round(plain_tuned, 2),
        "pipeline_over_bare": round(pipe["over_bare"], 3),
        "rounds": pipe["per_round"],
        "pipeline_over_plain": round(pipe["images_per_s"] / plain, 3),
        "dispatch_ms": {k: round(v, 2) for k, v in pipe["dispatch"].items()},
        "hdf5_write_mb_s": round(h5, 1),
        "pipeline_job": {k: v for k, v in pipe.items() if k not in ("dispatch", "per_round")},
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return report(args, argv)


def parser() -> Any:
    """The command line of ``featurefleet bench`` (also checked against benchmarks/gpu.sh)."""
    import argparse

    p = argparse.ArgumentParser(prog="featurefleet bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0,
                   help="duration of each bare-forward run (one before and after every job)")
    p.add_argument("--rounds", type=int, default=5,
                   help="measured pipeline jobs; the ratio to the bare forward is their median")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="CUDA autocast dtype (CPU runs fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT, or random where weights cannot be downloaded (same speed)")
    p.add_argument("--gflops", type=float, default=None,
                   help="model GFLOP per image, for model FLOP utilisation (ResNet-50: 8.2)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak TFLOP/s at this precision (H200 bf16: 989)")
    p.add_argument("--data", default="digits", choices=["digits", "photos"],
                   help="32 px digits JPEGs, or real-photo JPEGs (benchmarks/photos.py)")
    p.add_argument("--photo-size", default="500x375",
                   help="with --data photos: WIDTHxHEIGHT, e.g. 500x375 or 4000x3000")
    p.add_argument("--decode", default="auto", choices=["auto", "scaled", "full"],
                   help="backbone.decode: auto (nvJPEG on CUDA, else scaled), scaled, full")
    p.add_argument("--json", default=None, help="also write the JSON here")
    return p


def report(args: Any, argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _ensure_allocator_env(argv)
    r = run(args.model, args.batch, args.crop, args.images, args.shard_size, args.seconds,
            rounds=args.rounds, device=args.device, precision=args.precision,
            use_compile=args.compile, weights=args.weights, gflops_per_image=args.gflops,
            peak_tflops=args.peak_tflops, data=args.data, photo_size=args.photo_size,
            decode=args.decode)
    rounds = ", ".join(f"{x['ratio']:.3f}" for x in r["rounds"])
    rows = [
        ("bare forward", f"{r['bare_forward_img_s']:.1f} img/s"),
        ("pipeline (Celery+Redis+HDF5, 1 worker)", f"{r['pipeline_img_s']:.1f} img/s"),
        ("plain PyTorch loop (tutorial)", f"{r['plain_loop_img_s']:.1f} img/s"),
        ("  same loop with the workers' malloc env",
         f"{r['plain_loop_with_worker_allocator_img_s']:.1f} img/s"),
        ("pipeline / bare forward", f"{r['pipeline_over_bare']:.3f}  (target >= 0.95; median "
                                    f"of {rounds})"),
        ("pipeline / plain loop", f"{r['pipeline_over_plain']:.3f}  (target >= 1.5)"),
        ("dispatch, one task at a time (median)", f"{r['dispatch_ms']['median_ms']:.2f} ms"),
        ("dispatch per task in a burst of 100", f"{r['dispatch_ms']['burst_per_task_ms']:.2f} ms"
                                                "  (target <= 5)"),
        ("HDF5 write", f"{r['hdf5_write_mb_s']:.1f} MB/s"),
    ]
    if "mfu_bare" in r:
        rows.append(("model FLOP utilisation bare / pipeline",
                     f"{r['mfu_bare']:.1%} / {r['mfu_pipeline']:.1%}"))
    print(f"{r['model']} @{r['crop']}px, batch {r['batch']}, {r['threads']} threads, "
          f"{r['device']} {r['precision']}{' compiled' if r['compiled'] else ''}, "
          f"{r['images']} images ({r['data']}, decode {r['decode']})")
    for k, v in rows:
        print(f"  {k:<40} {v}")
    print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
