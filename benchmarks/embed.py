"""Embeddings: extraction + index throughput of a ``kind: embed`` job, and the IVF indexes'
recall@10 against exact search at scale.

1. One embed job on sklearn's digits (1,797 images, EfficientNet-Lite0 at ``--size`` px) on a
   private Redis + real worker processes: extraction samples/s, export + index seconds.
2. ``pipeline.embed.export`` on ``--vectors`` synthetic clustered vectors (``--dim``, written as
   real HDF5 shards): exact (flat) vs IVF-SQ8 vs IVF-PQ build seconds, vectors/s added,
   queries/s, and recall@10 against exact search at several ``nprobe``.

    .venv/bin/python benchmarks/embed.py [--vectors 200000] [--dim 256] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.jobs import run_job
from pipeline.embed import Searcher, export, recall_at_k, unit_rows
from pipeline.spec import EmbedSpec, JobSpec
from pipeline.store.shards import ShardData, write_shard
from workers.launcher import local_cluster


def job_row(out: Path, size: int) -> dict[str, Any]:
    spec = JobSpec.from_dict({"name": "bench-embed", "kind": "embed",
                              "data": {"source": "digits", "shard_size": 300},
                              "backbone": {"name": "efficientnet_lite0", "image_size": size},
                              "output": str(out / "jobs"), "store": str(out / "store")})
    with local_cluster(out / "cluster", extract_workers=1) as c:
        t0 = time.perf_counter()
        _st, rep = run_job(spec, c.broker)
    t = rep["timings"]
    return {"samples": rep["embeddings"]["count"], "job_s": round(time.perf_counter() - t0, 1),
            "extract_samples_per_s": t.get("extract_images_per_s"),
            "export_index_s": rep["embeddings"]["seconds"], "index": rep["embeddings"]["index"]}


def synthetic_shards(folder: Path, n: int, dim: int, per: int = 20000) -> list[str]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    paths = []
    for s in range(0, n, per):
        e = min(n, s + per)
        lab = rng.integers(0, 256, e - s)
        x = centres[lab] + 0.6 * rng.standard_normal((e - s, dim)).astype(np.float32)
        path = folder / f"{s:09d}.h5"
        write_shard(str(path), ShardData(
            features=x.astype(np.float16), labels=lab, indices=np.arange(s, e),
            sample_ids=[str(i) for i in range(s, e)], skipped=[], attrs={"key": "bench"},
            signatures=np.zeros((e - s, 256), np.float16)))
        paths.append(str(path))
    return paths


def index_rows(folder: Path, n: int, dim: int) -> dict[str, Any]:
    paths = synthetic_shards(folder, n, dim)
    names = [str(i) for i in range(256)]
    out: dict[str, Any] = {"vectors": n, "dim": dim}
    for kind in ("flat", "ivfsq8", "ivfpq"):
        d = folder / kind
        d.mkdir()
        done = export(paths, d, EmbedSpec(index=kind, recall_queries=500), names, True)
        s = Searcher(d)
        rng = np.random.default_rng(1)
        q = unit_rows(rng.standard_normal((1000, dim)).astype(np.float32))
        t0 = time.perf_counter()
        s.index.search(q, 10)
        qps = 1000 / (time.perf_counter() - t0)
        row: dict[str, Any] = {"build_s": round(done.seconds, 2),
                               "vectors_per_s": round(n / done.seconds),
                               "queries_per_s": round(qps), "recall_at_10": done.recall_at_10,
                               "index_mb": round((d / "index.faiss").stat().st_size / 1e6, 1),
                               **done.details}
        if kind != "flat":
            sample = unit_rows(np.stack([s.vector(str(i)) for i in rng.choice(n, 300)]))
            row["recall_by_nprobe"] = {}
            for nprobe in (1, 4, 16, 64):
                s.index.nprobe = nprobe
                row["recall_by_nprobe"][nprobe] = recall_at_k(s.index, sample, paths, 10)
        out[kind] = row
        print(json.dumps({kind: row}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--size", type=int, default=64, help="image size of the digits job")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ff-embed-"))
    out.mkdir(parents=True, exist_ok=True)
    job = job_row(out, args.size)
    print(json.dumps({"job": job}), flush=True)
    (out / "index").mkdir(exist_ok=True)
    idx = index_rows(out / "index", args.vectors, args.dim)
    (out / "embed.json").write_text(json.dumps({"job": job, "index": idx}, indent=2))
    print(f"\nembed job: {job['samples']} digits at {args.size} px, extraction "
          f"{job['extract_samples_per_s']} samples/s, export + index {job['export_index_s']} s")
    print(f"\n| index ({args.vectors} x {args.dim}) | build s | vectors/s | queries/s | "
          "recall@10 | MB |\n|---|---|---|---|---|---|")
    for kind in ("flat", "ivfsq8", "ivfpq"):
        r = idx[kind]
        print(f"| {kind} | {r['build_s']} | {r['vectors_per_s']} | {r['queries_per_s']} | "
              f"{r['recall_at_10'] if r['recall_at_10'] is not None else '1 (exact)'} | "
              f"{r['index_mb']} |")
    for kind in ("ivfsq8", "ivfpq"):
        print(f"{kind} recall@10 by nprobe: {idx[kind]['recall_by_nprobe']}")


if __name__ == "__main__":
    main()
