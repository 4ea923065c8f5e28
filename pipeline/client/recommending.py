"""The recommendation demo's data, and a loader for the MovieLens layout.

No interaction data set with a redistributable licence installs offline, so the demo's
interactions are **simulated** (and named and labelled so everywhere): the items are real —
Debian packages, their descriptions as item text (``apt-cache dumpavail``, as the text demo) —
and each simulated user prefers a few hidden topics (the packages' Debian sections, which no
model sees) mixed with item popularity (Zipf), choosing 8-40 items over time.

MovieLens (``ratings.csv`` + ``movies.csv``, GroupLens; its licence forbids redistribution, so
only a copy the user downloaded is read, never shipped): :func:`movielens` writes the items
table (``movieId``, text = title and genres) and names the columns of ``ratings.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import FeaturefleetError

if TYPE_CHECKING:
    import argparse

SIMULATED_NAME = "interactions-SIMULATED.csv"


def simulate(sections: list[str], users: int, seed: int) -> np.ndarray:
    """(user, item, time) rows of simulated users: each prefers a Dirichlet mix of the items'
    hidden topics (their sections), weighted by a Zipf popularity over a random item order."""
    rng = np.random.default_rng(seed)
    names = sorted(set(sections))
    topic = np.asarray([names.index(s) for s in sections])
    n = len(sections)
    popularity = 1.0 / (1 + rng.permutation(n)) ** 0.8
    rows = []
    for u in range(users):
        pref = rng.dirichlet(np.full(len(names), 0.3))
        score = pref[topic] * popularity ** 0.5
        k = int(rng.integers(8, 40))
        items = rng.choice(n, size=min(k, n), replace=False, p=score / score.sum())
        start = rng.uniform(0, 3.0e7)
        times = np.sort(start + rng.exponential(86_400.0 * 7, len(items)).cumsum())
        rows += [(u, int(i), float(t)) for i, t in zip(items, times, strict=True)]
    return np.asarray(rows, np.float64)


def write_simulated(out: Path, per_section: int = 150, users: int = 2000,
                    seed: int = 0) -> tuple[Path, Path]:
    """Write the Debian items table (``package``, ``text``, ``label`` = section) and the
    simulated interactions (``user``, ``item``, ``timestamp``); return both paths."""
    from pipeline.client.debian import write_debian_csv

    out.mkdir(parents=True, exist_ok=True)
    items_csv = write_debian_csv(out / "items.csv", per_class=per_section, seed=seed)
    with open(items_csv, newline="") as fh:
        items = list(csv.DictReader(fh))
    rows = simulate([r["label"] for r in items], users, seed)
    inter = out / SIMULATED_NAME
    with open(inter, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        for u, i, t in rows:
            w.writerow([f"sim-user-{int(u)}", items[int(i)]["package"], f"{t:.0f}"])
    return items_csv, inter


def movielens(folder: str | Path, out: Path) -> tuple[Path, dict[str, Any]]:
    """A MovieLens copy (``ratings.csv`` + ``movies.csv``: ml-latest-small, ml-25m...) as the
    items table (``movieId``, ``text`` = "title (genres)") and the ``recommend`` section that
    reads ``ratings.csv`` (ratings of 4 and above are positives).

    Raises:
        FeaturefleetError: the folder lacks the two files.
    """
    root = Path(folder).expanduser()
    ratings, movies = root / "ratings.csv", root / "movies.csv"
    if not (ratings.is_file() and movies.is_file()):
        raise FeaturefleetError(f"{str(root)!r} lacks ratings.csv and movies.csv; fix: pass "
                                "the folder of a MovieLens download (e.g. ml-latest-small)")
    out.mkdir(parents=True, exist_ok=True)
    items = out / "movielens-items.csv"
    with open(movies, newline="", encoding="utf-8") as src, open(items, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["movieId", "text"])
        for r in csv.DictReader(src):
            genres = (r.get("genres") or "").replace("|", ", ")
            w.writerow([r["movieId"], f"{r.get('title', '')} ({genres})"])
    return items, {"interactions": str(ratings), "user_column": "userId",
                   "item_column": "movieId", "time_column": "timestamp",
                   "rating_column": "rating", "min_rating": 4.0}


def recommend_command(args: argparse.Namespace) -> int:
    """``featurefleet recommend JOB --user U``: the user's top items from a finished job."""
    import json

    from pipeline.recommend import recommendations_for

    if not 1 <= args.k <= 10_000:
        raise FeaturefleetError(f"-k {args.k} is out of range; fix: ask for 1 to 10000 items")
    got = recommendations_for(args.job, args.user, args.k, args.part)
    if args.json:
        print(json.dumps(got, indent=2))
        return 0
    for r in got:
        print(f"{r['part']:4s} {r['rank']:4d}  {r['score']:.4f}  {r['item']}  ({r['model']})")
    return 0
