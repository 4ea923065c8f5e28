"""Embeddings as a product (``kind: embed``): every sample's stored features exported with a
nearest-neighbour index, and search over it.

:func:`export` streams the job's shards (bounded memory) into ``embeddings.parquet`` (sample id,
index, label, the L2-normalised vector) and a faiss index whose row *r* is the Parquet file's row
*r*: exact inner product (= cosine) up to ``exact_up_to`` vectors; above it IVF-PQ, trained on a
sample of the vectors, filled shard by shard, its recall@10 against exact search measured on
sampled queries (exact neighbours found by streaming the shards again). :class:`Searcher` answers
queries by sample id, by vector, or by new samples (images, texts, clips) embedded with the job's
backbone and preprocessing.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import FeaturefleetError
from pipeline.fsio import atomic_path, atomic_write_text
from pipeline.spec import EmbedSpec
from pipeline.store.shards import ShardReader

INDEX_FILE = "index.faiss"
TABLE_FILE = "embeddings.parquet"
META_FILE = "embed.json"
RECALL_K = 10
CHUNK = 8192


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), float32, C-contiguous."""
    x = np.ascontiguousarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = x / np.maximum(norms, 1e-12)
    return out


def _pq_subquantizers(dim: int) -> int:
    """PQ sub-vectors: the largest divisor of ``dim`` up to 64 that leaves >= 2 dims each."""
    for m in range(min(64, dim // 2), 0, -1):
        if dim % m == 0:
            return m
    return 1


@dataclass
class Exported:
    count: int
    dim: int
    index: str
    seconds: float
    recall_at_10: float | None
    details: dict[str, Any]


def export(shard_paths: Sequence[str], out_dir: Path, settings: EmbedSpec,
           class_names: Sequence[str], labeled: bool, seed: int = 0) -> Exported:
    """Write ``embeddings.parquet``, ``index.faiss`` and ``embed.json`` into ``out_dir``.

    Raises:
        FeaturefleetError: no rows to index, or non-finite features.
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    reader = ShardReader(list(shard_paths))
    n, dim = reader.rows, reader.dim
    if n == 0:
        raise FeaturefleetError("no sample could be embedded (every one was skipped); fix: "
                                "check the data (featurefleet report shows the reasons)")
    kind = settings.index if settings.index != "auto" else (
        "flat" if n <= settings.exact_up_to else "ivfsq8")
    if kind != "flat" and n < 4 * 256:
        kind = "flat"  # too few vectors to train inverted lists (and quantizers) on
    rng = np.random.default_rng(seed)
    sample_p = min(1.0, settings.train_sample / n)
    train: list[np.ndarray] = []
    flat = faiss.IndexFlatIP(dim)
    schema = pa.schema([("sample_id", pa.string()), ("index", pa.int64()),
                        ("label", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    ids = reader.sample_ids()
    at = 0
    with atomic_path(out_dir / TABLE_FILE) as tmp, pq.ParquetWriter(str(tmp), schema) as w:
        for x, y, idx in reader.chunks(CHUNK):
            if not np.isfinite(x).all():
                bad = ids[at + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])]
                raise FeaturefleetError(f"sample {bad!r} has non-finite features; fix: check "
                                        "the backbone's weights and precision")
            v = unit_rows(x)
            labels = [class_names[int(c)] if labeled else None for c in y]
            w.write_table(pa.table({
                "sample_id": ids[at: at + len(idx)], "index": idx.astype(np.int64),
                "label": labels,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)},
                schema=schema))
            at += len(idx)
            if kind == "flat":
                flat.add(v)
            else:
                take = rng.random(len(v)) < sample_p
                train.append(v[take])
    details: dict[str, Any] = {}
    recall = None
    if kind == "flat":
        index: Any = flat
    else:
        xt = np.concatenate(train)
        nlist = int(min(65536, max(16, 4 * math.sqrt(n)), max(16, len(xt) // 39)))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivfpq":
            m = _pq_subquantizers(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            details = {"pq_subvectors": m, "pq_bits": 8}
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist,
                                                  faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
            details = {"scalar_bits": 8}
        index.train(xt)
        for x, _y, _i in ShardReader(list(shard_paths)).chunks(CHUNK):
            index.add(unit_rows(x))
        index.nprobe = min(settings.nprobe, nlist)
        details.update({"nlist": nlist, "nprobe": index.nprobe, "trained_on": len(xt)})
        queries = xt[rng.permutation(len(xt))[:settings.recall_queries]]
        recall = recall_at_k(index, queries, shard_paths, RECALL_K)
    with atomic_path(out_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    seconds = time.perf_counter() - t0
    meta = {"count": n, "dim": dim, "metric": "cosine (inner product of unit vectors)",
            "index": kind, "recall_at_10": recall, "index_file": INDEX_FILE,
            "table_file": TABLE_FILE, "seconds": round(seconds, 3), **details}
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2), fsync=False)
    return Exported(n, dim, kind, seconds, recall, details)


def recall_at_k(index: Any, queries: np.ndarray, shard_paths: Sequence[str], k: int) -> float:
    """Share of each query's exact top-``k`` (inner product, streamed over the shards) that
    ``index`` returns in its own top-``k``, averaged over the queries."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    at = 0
    for x, _y, _i in ShardReader(list(shard_paths)).chunks(CHUNK):
        s = queries @ unit_rows(x).T
        ids = np.broadcast_to(np.arange(at, at + len(x)), s.shape)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, ids], axis=1)
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(s_all, top, axis=1)
        best_i = np.take_along_axis(i_all, top, axis=1)
        at += len(x)
    _, got = index.search(np.ascontiguousarray(queries, np.float32), k)
    hits = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(best_i, got, strict=True)]
    return round(float(np.mean(hits)), 4)


class Searcher:
    """Nearest neighbours in an ``embed`` job's index (cosine similarity, highest first)."""

    def __init__(self, job_dir: str | Path, device: str = "cpu") -> None:
        import faiss
        import pyarrow.parquet as pq

        self.job_dir = Path(job_dir).expanduser()
        meta_path = self.job_dir / META_FILE
        if not meta_path.is_file():
            raise FeaturefleetError(f"{str(job_dir)!r} has no {META_FILE}; fix: search the "
                                    "folder of a finished kind: embed job (<output>/jobs/<id>)")
        self.meta = json.loads(meta_path.read_text())
        self.index = faiss.read_index(str(self.job_dir / self.meta["index_file"]))
        table = pq.read_table(self.job_dir / self.meta["table_file"],
                              columns=["sample_id", "index", "label"])
        self.ids = table.column("sample_id").to_pylist()
        self.indices = table.column("index").to_pylist()
        self.labels = table.column("label").to_pylist()
        self._row = {sid: r for r, sid in enumerate(self.ids)}
        self.device = device

    @functools.cached_property
    def plan(self) -> Any:
        """The embed job's plan (its backbone and preprocessing), read once when needed."""
        from pipeline.plan import read_plan

        return read_plan(self.job_dir)

    @property
    def modality(self) -> str:
        """What the index embeds (``image``, ``text`` or ``audio``): what new queries must be."""
        return str(self.plan.backbone.preprocessing.get("modality", "image"))

    def _results(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        return [{"rank": r + 1, "sample_id": self.ids[int(i)], "index": self.indices[int(i)],
                 "label": self.labels[int(i)], "similarity": round(float(s), 5)}
                for r, (s, i) in enumerate(zip(scores, rows, strict=True)) if i >= 0]

    def vector(self, sample_id: str) -> np.ndarray:
        """The stored (unit) vector of ``sample_id``.

        Raises:
            FeaturefleetError: an id the index does not hold.
        """
        import pyarrow.parquet as pq

        row = self._row.get(sample_id)
        if row is None:
            near = [s for s in self.ids if sample_id in s][:3]
            raise FeaturefleetError(f"sample {sample_id!r} is not in this index ("
                                    f"{len(self.ids)} samples"
                                    + (f"; similar ids: {', '.join(near)}" if near else "")
                                    + "); fix: use an id from embeddings.parquet")
        pf = pq.ParquetFile(self.job_dir / self.meta["table_file"])
        start = 0
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if row < start + rows:
                col = pf.read_row_group(g, columns=["embedding"]).column("embedding")
                return np.asarray(col[row - start].as_py(), np.float32)
            start += rows
        raise FeaturefleetError(f"sample {sample_id!r}: row {row} is missing from the table; "
                                "fix: run the embed job again")

    def by_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[dict[str, Any]]]:
        scores, rows = self.index.search(unit_rows(np.atleast_2d(vectors)), k)
        return [self._results(s, r) for s, r in zip(scores, rows, strict=True)]

    def by_id(self, sample_id: str, k: int = 10) -> list[dict[str, Any]]:
        """Neighbours of a stored sample (itself first)."""
        return self.by_vectors(self.vector(sample_id)[None], k)[0]

    def by_samples(self, samples: Sequence[Any], k: int = 10) -> list[list[dict[str, Any]]]:
        """Neighbours of new samples (image paths or arrays, texts, audio paths), embedded
        with the job's backbone and preprocessing."""
        from pipeline.backbones import preprocessing_from_dict
        from pipeline.predict import Classifier

        plan = self.plan
        embedder = Classifier(head=None, backbone=plan.backbone.name,
                              weights=plan.backbone.weights,
                              preprocessing=preprocessing_from_dict(plan.backbone.preprocessing),
                              class_names=[], device=self.device,
                              decode=plan.spec.backbone.decode)
        return self.by_vectors(embedder.features(list(samples)), k)
