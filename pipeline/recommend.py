"""Recommendation from interactions and item content (``kind: recommend``): the models, trained
on the training interactions and the items' stored features, and their evaluation.

Models (each ranks, for every user, the items they have not trained on):

- ``random`` and ``popularity`` (training interaction counts; every cold item has 0);
- ``EASE`` — collaborative filtering for warm items (closed form, Steck 2019:
  ``B = I - P diag(1/diag P)``, ``P = (X'X + λI)^-1``, ``diag B = 0``); λ from
  ``recommend.cf_l2``, chosen on a validation part of training (a random tenth of each user's
  training interactions), then refitted on all of training;
- ``content kNN`` — a user is the mean of their training items' unit embeddings, items are
  scored by cosine: it needs no interaction with the item, so it ranks cold items too;
- ``content -> CF`` — a ridge map from content embeddings to the collaborative item factors
  (truncated SVD of the training matrix), so a cold item gets collaborative factors from its
  content alone.

Metrics per user, averaged over the users with held-out items: Recall@K (hits / min(K,
held-out)), NDCG@K; catalogue coverage@K (distinct items recommended / candidates); warm
items and cold items apart. Scores are computed in blocks of users (memory ~ block x items).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.embed import unit_rows as unit
from pipeline.spec import RecommendSpec

TRAIN, WARM, COLD = 0, 1, 2
USER_BLOCK = 1024
FACTORS = 64
RIDGE = 1.0
VALIDATION = 0.1

Scorer = Callable[[np.ndarray], np.ndarray]  # user indices -> scores (users x items)


def matrix(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int) -> Any:
    """The binary users x items matrix (scipy CSR) of these interactions."""
    from scipy import sparse

    x = sparse.csr_matrix((np.ones(len(user), np.float32), (user, item)),
                          shape=(n_users, n_items))
    x.data[:] = 1.0
    return x


def ease(x: Any, items: np.ndarray, l2: float) -> np.ndarray:
    """EASE's item-item weights on the ``items`` columns (dense, len(items)^2)."""
    xi = x[:, items]
    g = (xi.T @ xi).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += l2
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    out: np.ndarray = b.astype(np.float32)
    return out


def evaluate(score: Scorer, train: Any, truth: list[set[int]], candidates: np.ndarray,
             ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K and NDCG@K per user (averaged over users with held-out items) and
    coverage@K, ranking ``candidates`` minus each user's training items."""
    users = np.asarray([u for u, t in enumerate(truth) if t], np.int64)
    out: dict[str, list[float]] = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
    shown: dict[int, set[int]] = {k: set() for k in ks}
    kmax = max(ks)
    mask = np.full(train.shape[1], -np.inf, np.float32)
    mask[candidates] = 0.0
    for s in range(0, len(users), USER_BLOCK):
        block = users[s:s + USER_BLOCK]
        sc = score(block).astype(np.float32) + mask[None, :]
        seen = train[block]
        sc[seen.nonzero()] = -np.inf
        top = np.argpartition(-sc, min(kmax, sc.shape[1] - 1), axis=1)[:, :kmax]
        order = np.take_along_axis(sc, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        for row, u in enumerate(block):
            t = truth[int(u)]
            ranked = [int(i) for i in top[row] if np.isfinite(sc[row, i])]
            for k in ks:
                hit = [1.0 if i in t else 0.0 for i in ranked[:k]]
                out[f"recall@{k}"].append(sum(hit) / min(len(t), k))
                dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hit))
                idcg = sum(1 / np.log2(r + 2) for r in range(min(len(t), k)))
                out[f"ndcg@{k}"].append(dcg / idcg)
                shown[k].update(ranked[:k])
    res = {m: round(float(np.mean(v)), 4) if v else None for m, v in out.items()}
    for k in ks:
        res[f"coverage@{k}"] = round(len(shown[k]) / max(1, len(candidates)), 4)
    res["users"] = len(users)
    return res  # type: ignore[return-value]


def top_k(score: Scorer, train: Any, candidates: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every user's top ``k`` of ``candidates`` they have not trained on: (user, item, score)
    rows, best first per user; computed a block of users at a time."""
    us, its, scs = [], [], []
    mask = np.full(train.shape[1], -np.inf, np.float32)
    mask[candidates] = 0.0
    kk = min(k, len(candidates))
    for s in range(0, train.shape[0], USER_BLOCK):
        block = np.arange(s, min(train.shape[0], s + USER_BLOCK))
        sc = score(block).astype(np.float32) + mask[None, :]
        sc[train[block].nonzero()] = -np.inf
        top = np.argpartition(-sc, kk - 1, axis=1)[:, :kk] if kk else np.zeros((len(block), 0),
                                                                                int)
        val = np.take_along_axis(sc, top, axis=1)
        order = np.argsort(-val, axis=1)
        top, val = np.take_along_axis(top, order, 1), np.take_along_axis(val, order, 1)
        ok = np.isfinite(val)
        us.append(np.repeat(block, kk).reshape(len(block), kk)[ok])
        its.append(top[ok])
        scs.append(val[ok])
    return (np.concatenate(us) if us else np.zeros(0, np.int64),
            np.concatenate(its) if its else np.zeros(0, np.int64),
            np.concatenate(scs) if scs else np.zeros(0, np.float32))


def truths(user: np.ndarray, item: np.ndarray, n_users: int) -> list[set[int]]:
    out: list[set[int]] = [set() for _ in range(n_users)]
    for u, i in zip(user.tolist(), item.tolist(), strict=True):
        out[u].add(i)
    return out


def run(data: dict[str, np.ndarray], features: np.ndarray, has_features: np.ndarray,
        cfg: RecommendSpec, seed: int,
        sweep: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Fit every model on the training interactions, evaluate warm and cold; the results.

    ``features``: every item's content embedding (rows of items without one are zero and
    ``has_features`` False: they cannot be ranked by content). ``sweep``: EASE's penalties
    already scored (:func:`sweep_point`, one task each); scored here when None."""
    t0 = time.perf_counter()
    user, item, part = data["user"], data["item"], data["part"]
    n_users, n_items = len(data["user_names"]), len(features)
    ks = tuple(sorted(set(cfg.ks)))
    rng = np.random.default_rng(seed)
    tr = part == TRAIN
    x = matrix(user[tr], item[tr], n_users, n_items)
    cold_items = np.unique(item[part == COLD])
    warm_items = np.setdiff1d(np.unique(item), cold_items)
    cold_ranked = cold_items[has_features[cold_items]]
    warm_truth = truths(user[part == WARM], item[part == WARM], n_users)
    cold_truth = truths(user[part == COLD], item[part == COLD], n_users)
    emb = unit(features)
    pop = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
    tie = rng.random(n_items).astype(np.float32) * 1e-3  # cold items all have 0 interactions
    notes: list[str] = []
    if len(cold_ranked) < len(cold_items):
        notes.append(f"{len(cold_items) - len(cold_ranked)} cold items have no content "
                     "features (unreadable or empty): no model can rank them")

    def random_scores(users: np.ndarray) -> np.ndarray:
        return np.random.default_rng([seed, int(users[0])]).random((len(users), n_items))

    def popularity(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(pop + tie, (len(users), n_items)).copy()

    def content(users: np.ndarray) -> np.ndarray:
        profile = unit(np.asarray(x[users] @ emb))
        out: np.ndarray = profile @ emb.T
        return out

    models: dict[str, tuple[Scorer, tuple[str, ...]]] = {
        "random": (random_scores, ("warm", "cold")),
        "popularity": (popularity, ("warm", "cold")),
        "content kNN": (content, ("warm", "cold"))}
    cf: dict[str, Any] = {}
    if 2 <= len(warm_items) <= cfg.max_cf_items:
        curve = sorted(sweep or [sweep_point(data, v, ks, seed) for v in cfg.cf_l2],
                       key=lambda c: c["l2"])
        chosen = choose_l2(curve, max(ks))
        b = ease(x, warm_items, chosen)
        cf = {"model": "EASE", "l2": chosen, "validation": curve}

        def collaborative(users: np.ndarray) -> np.ndarray:
            out = np.zeros((len(users), n_items), np.float32)
            out[:, warm_items] = np.asarray(x[users][:, warm_items] @ b)
            return out

        models["EASE (collaborative)"] = (collaborative, ("warm",))
    else:
        notes.append(f"{len(warm_items)} warm items: collaborative filtering (EASE) needs 2 to "
                     f"recommend.max_cf_items = {cfg.max_cf_items}; not fitted")
    if len(cold_ranked) and x.nnz and min(x.shape) > 2:
        from scipy.sparse.linalg import svds

        k = max(1, min(FACTORS, min(x.shape) - 1))
        u_, s_, vt = svds(x.astype(np.float64), k=k, random_state=int(rng.integers(1 << 31)))
        item_f = (vt.T * s_).astype(np.float32)
        user_f = u_.astype(np.float32)
        trained = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
        xw = emb[trained]
        w = np.linalg.solve(xw.T @ xw + RIDGE * np.eye(emb.shape[1], dtype=np.float32),
                            xw.T @ item_f[trained])
        mapped = emb @ w

        def content_to_cf(users: np.ndarray) -> np.ndarray:
            out: np.ndarray = user_f[users] @ mapped.T
            return out

        models["content -> CF factors"] = (content_to_cf, ("cold",))
    results: dict[str, dict[str, Any]] = {"warm": {}, "cold": {}}
    for name, (score, parts) in models.items():
        if "warm" in parts and any(warm_truth):
            results["warm"][name] = evaluate(score, x, warm_truth, warm_items, ks)
        if "cold" in parts and any(cold_truth) and len(cold_ranked):
            results["cold"][name] = evaluate(score, x, cold_truth, cold_ranked, ks)
    k = max(ks)
    best = {p: max(r, key=lambda m: r[m][f"recall@{k}"] or 0.0) if r else None
            for p, r in results.items()}
    lists = {part: top_k(models[name][0], x, cand, k) for part, name, cand in (
        ("warm", best["warm"], warm_items), ("cold", best["cold"], cold_ranked))
        if name is not None}
    return {"results": results, "best": best, "k": k, "collaborative": cf, "notes": notes,
            "lists": lists,
            "users": n_users, "items": n_items, "warm_items": len(warm_items),
            "cold_items": len(cold_items), "seconds": round(time.perf_counter() - t0, 3)}


def sweep_point(data: dict[str, np.ndarray], l2: float, ks: tuple[int, ...],
                seed: int) -> dict[str, float]:
    """One EASE penalty scored for the choice (one task of the fanned-out sweep): fitted on
    training minus a seeded random tenth of it, Recall@K on that tenth, warm items."""
    user, item, part = data["user"], data["item"], data["part"]
    n_users, n_items = len(data["user_names"]), len(data["item_names"])
    tr = part == TRAIN
    warm_items = np.setdiff1d(np.unique(item), np.unique(item[part == COLD]))
    held = np.random.default_rng([seed, 7]).random(int(tr.sum())) < VALIDATION
    fit = matrix(user[tr][~held], item[tr][~held], n_users, n_items)
    truth = truths(user[tr][held], item[tr][held], n_users)
    b = ease(fit, warm_items, l2)

    def score(users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), n_items), np.float32)
        out[:, warm_items] = np.asarray(fit[users][:, warm_items] @ b)
        return out

    k = max(ks)
    m = evaluate(score, fit, truth, warm_items, (k,))
    return {"l2": float(l2), f"recall@{k}": m[f"recall@{k}"] or 0.0}


def choose_l2(curve: list[dict[str, float]], k: int) -> float:
    """The penalty with the best validation Recall@K (ties: the stronger)."""
    return max(curve, key=lambda c: (c[f"recall@{k}"], c["l2"]))["l2"]


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def recommendations_for(job_dir: str | Path, user: str, k: int = 10,
                        part: str = "both") -> list[dict[str, Any]]:
    """A user's top ``k`` from a finished job's ``recommendations.parquet`` (``warm``: the best
    warm model among warm items; ``cold``: the best cold model among cold items).

    Raises:
        FeaturefleetError: no such job output, or no such user (with the fix).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.errors import FeaturefleetError

    path = Path(job_dir).expanduser() / "recommendations.parquet"
    if not path.is_file():
        raise FeaturefleetError(f"{str(path)!r} does not exist; fix: name the folder of a "
                                "finished kind: recommend job (<output>/jobs/<id>)")
    table = pq.read_table(path)
    rows = table.filter(pc.equal(table["user"], user))
    if part != "both":
        rows = rows.filter(pc.equal(rows["part"], part))
    if rows.num_rows == 0:
        known = table["user"].unique().to_pylist()
        if user not in known:
            raise FeaturefleetError(f"user {user!r} is not in this job's interactions (e.g. "
                                    f"{', '.join(map(repr, known[:3]))}); fix: use a user id "
                                    "as the interactions table writes it")
    out = sorted(rows.to_pylist(), key=lambda r: (r["part"] != "warm", r["rank"]))
    return [r for r in out if r["rank"] <= k]
