"""Nearest neighbours by cosine similarity, in bounded memory.

A task takes one block of query rows (sample ids) and streams every shard against it in
blocks of ``ref_rows``: faiss computes each block's top-k inner products of unit vectors, and
the running top-k is merged with numpy. Memory is (query rows + ref_rows) × dim floats plus
query rows × k results, whatever the size of the data set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.store.shards import ShardReader


@dataclass
class Neighbors:
    """For each query sample (``idx``): its ``k`` nearest other samples and their cosine
    similarities, most similar first (-1 / -inf where there are fewer than k others)."""

    idx: np.ndarray  # (n,) sample indices of the query rows
    y: np.ndarray  # (n,) their labels
    nbr: np.ndarray  # (n, k) sample indices
    sim: np.ndarray  # (n, k) float32
    nonfinite: np.ndarray  # sample indices whose features are NaN/inf (left out)
    # the same for the image signatures (aligned with idx; None: shards without signatures)
    sig_nbr: np.ndarray | None = None
    sig_sim: np.ndarray | None = None
    # the best of those candidates again by their crop-aligned signatures (``aligned``;
    # None: not images, or no signatures)
    al_nbr: np.ndarray | None = None
    al_sim: np.ndarray | None = None
    # the best few candidates again by their aligned fine detail (``detail``; None: not
    # images, or shards without their pictures)
    dt_nbr: np.ndarray | None = None
    dt_sim: np.ndarray | None = None

    def tables(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each near-copy signal's neighbour table (indices, similarities), where it has one."""
        out = {"features": (self.nbr, self.sim)}
        for signal, nbr, sim in (("signatures", self.sig_nbr, self.sig_sim),
                                 ("aligned", self.al_nbr, self.al_sim),
                                 ("detail", self.dt_nbr, self.dt_sim)):
            if nbr is not None and sim is not None:
                out[signal] = (nbr, sim)
        return out

    def with_signatures(self, other: Neighbors) -> Neighbors:
        """These neighbours plus ``other``'s (found on signatures), aligned by sample."""
        pos = {int(i): r for r, i in enumerate(other.idx)}
        k = other.nbr.shape[1]
        nbr = np.full((len(self.idx), k), -1, np.int64)
        sim = np.full((len(self.idx), k), -np.inf, np.float32)
        for r, i in enumerate(self.idx.tolist()):
            if i in pos:
                nbr[r], sim[r] = other.nbr[pos[i]], other.sim[pos[i]]
        return Neighbors(self.idx, self.y, self.nbr, self.sim, self.nonfinite, nbr, sim)

    def with_aligned(self, paths: list[str]) -> Neighbors:
        """These neighbours plus the ``aligned`` table: each row's best candidates by the
        features and by the signatures, scored by :func:`aligned.scores` on the
        signatures the shards hold."""
        from pipeline.quality import aligned

        cand = aligned.candidates(self.nbr, self.sig_nbr)
        sigs, sidx = sorted_rows(paths, np.concatenate([self.idx, cand[cand >= 0]]),
                                 "signatures")
        nbr, sim = aligned.table(self.idx, cand, sigs, sidx)
        return Neighbors(self.idx, self.y, self.nbr, self.sim, self.nonfinite, self.sig_nbr,
                         self.sig_sim, nbr, sim)

    def with_detail(self, paths: list[str]) -> Neighbors:
        """These neighbours plus the ``detail`` table: each row's best candidates by the
        aligned thumbnail and by the features, scored by :func:`detail.similarity` on the
        pictures the shards hold (StoreError: shards without them)."""
        from dataclasses import replace

        from pipeline.quality import detail

        cand = detail.candidates(self.al_nbr, self.nbr)
        pics, pidx = sorted_rows(paths, np.concatenate([self.idx, cand[cand >= 0]]),
                                 "details", np.uint8)
        nbr, sim = detail.table(self.idx, cand, pics, pidx)
        return replace(self, dt_nbr=nbr, dt_sim=sim)


def sorted_rows(paths: list[str], ids: np.ndarray, field: str,
                dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The ``field`` rows the shards hold for the samples ``ids`` (any order, repeats
    allowed), sorted by sample index, and those indices (StoreError: no such dataset)."""
    x, _, idx = ShardReader(paths, ids, field).read(dtype)
    order = np.argsort(idx)
    return x[order], idx[order]


def detail_scorer(paths: list[str]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``score(a, b)``: the aligned fine detail (``detail.similarity``) of the sample pairs
    (``a[i]``, ``b[i]``), on the pictures the shards hold (+inf where one has none, so that
    nothing is dropped for want of a picture)."""
    def score(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        from pipeline.quality import detail

        out = np.full(len(a), np.inf, np.float32)
        pics, pidx = sorted_rows(paths, np.concatenate([a, b]), "details", np.uint8)
        if not len(pidx):
            return out
        ra = np.clip(np.searchsorted(pidx, a), 0, len(pidx) - 1)
        rb = np.clip(np.searchsorted(pidx, b), 0, len(pidx) - 1)
        ok = (pidx[ra] == a) & (pidx[rb] == b)
        out[ok] = detail.similarity(pics, ra[ok], rb[ok])
        return out
    return score


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length (a zero row stays zero), and the mask of finite rows."""
    x = np.asarray(x, np.float32)
    finite = np.isfinite(x).all(axis=1)
    x = np.where(finite[:, None], x, 0.0).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12), finite


def search(paths: list[str], query_ids: Sequence[int], reference_ids: Sequence[int], k: int,
           ref_rows: int = 16384, field: str = "features") -> Neighbors:
    """The ``k`` nearest neighbours of every query sample among the reference samples, by
    the cosine of their ``field`` rows (``features`` or ``signatures``)."""
    import faiss

    qx, qy, qidx = ShardReader(paths, np.asarray(query_ids, np.int64), field).read()
    q, q_ok = unit_rows(qx)
    del qx
    bad = [qidx[~q_ok]]
    q, qy, qidx = np.ascontiguousarray(q[q_ok]), qy[q_ok], qidx[q_ok]
    best_sim = np.full((len(qidx), k), -np.inf, np.float32)
    best_nbr = np.full((len(qidx), k), -1, np.int64)
    reader = ShardReader(paths, np.asarray(reference_ids, np.int64), field)
    for rx, _ry, ridx in reader.chunks(max_rows=ref_rows):
        r, r_ok = unit_rows(rx)
        del rx
        r, ridx = np.ascontiguousarray(r[r_ok]), ridx[r_ok]
        if not len(ridx) or not len(qidx):
            continue
        kk = min(k + 1, len(ridx))  # +1: a query finds itself when it is a reference too
        sim, pos = faiss.knn(q, r, kk, metric=faiss.METRIC_INNER_PRODUCT)
        nbr = np.where(pos >= 0, ridx[np.clip(pos, 0, None)], -1)
        sim = np.where(nbr == qidx[:, None], -np.inf, sim).astype(np.float32)  # not itself
        all_sim = np.concatenate([best_sim, sim], axis=1)
        all_nbr = np.concatenate([best_nbr, nbr], axis=1)
        order = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]
        best_sim = np.take_along_axis(all_sim, order, axis=1)
        best_nbr = np.take_along_axis(all_nbr, order, axis=1)
    best_nbr[~np.isfinite(best_sim)] = -1
    return Neighbors(idx=qidx, y=qy, nbr=best_nbr, sim=best_sim,
                     nonfinite=np.concatenate(bad))


def save(nb: Neighbors, path: str) -> None:
    from pipeline.fsio import atomic_path

    extra: dict[str, np.ndarray] = {}
    if nb.sig_nbr is not None and nb.sig_sim is not None:
        extra = {"sig_nbr": nb.sig_nbr, "sig_sim": nb.sig_sim}
    if nb.al_nbr is not None and nb.al_sim is not None:
        extra |= {"al_nbr": nb.al_nbr, "al_sim": nb.al_sim}
    if nb.dt_nbr is not None and nb.dt_sim is not None:
        extra |= {"dt_nbr": nb.dt_nbr, "dt_sim": nb.dt_sim}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{"idx": nb.idx, "y": nb.y, "nbr": nb.nbr, "sim": nb.sim,
                        "nonfinite": nb.nonfinite, **extra})  # type: ignore[arg-type]


def load(paths: Sequence[str]) -> Neighbors:
    """Every block's neighbours as one table."""
    parts = []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files})
    if not parts:
        return Neighbors(np.zeros(0, np.int64), np.zeros(0, np.int64),
                         np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32),
                         np.zeros(0, np.int64))
    def joined(*keys: str) -> list[np.ndarray | None]:
        if not all(k in p for p in parts for k in keys):
            return [None] * len(keys)
        return [np.concatenate([p[k] for p in parts]) for k in keys]

    return Neighbors(*(np.concatenate([p[k] for p in parts])
                       for k in ("idx", "y", "nbr", "sim", "nonfinite")),
                     *joined("sig_nbr", "sig_sim"), *joined("al_nbr", "al_sim"),
                     *joined("dt_nbr", "dt_sim"))
