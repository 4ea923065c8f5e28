"""The ratio test on the fine-detail tables (pipeline/quality/standout.py): a copy whose
original has nothing else nearly as close counts, where the data's own distinct samples are
too alike for the natural-likeness floor to let it through."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.quality import standout, summary
from pipeline.quality.neighbors import Neighbors


def table(s1: np.ndarray, s2: np.ndarray, best: np.ndarray) -> Neighbors:
    """A neighbour table whose fine-detail columns hold (best, s1) and (another, s2)."""
    n = len(s1)
    idx = np.arange(n)
    other = (idx + 7) % n
    return Neighbors(idx=idx, y=np.zeros(n, np.int64), nbr=np.stack([best, other], 1),
                     sim=np.stack([s1, s2], 1).astype(np.float32),
                     nonfinite=np.zeros(0, np.int64),
                     dt_nbr=np.stack([best, other], 1),
                     dt_sim=np.stack([s1, s2], 1).astype(np.float32))


def crowded(seed: int, n: int = 2000, copies: int = 40) -> tuple[Neighbors, np.ndarray, Any]:
    """Samples whose two best candidates are both close (crops of one photo that overlap:
    1 - s log-normal around 0.1, the second a little further), and ``copies`` rows whose
    best is a copy at 0.93-0.96 with the next candidate as far as the others'."""
    rng = np.random.default_rng(seed)
    d1 = np.exp(rng.normal(np.log(0.1), 0.6, n))
    d2 = d1 * np.exp(np.abs(rng.normal(0.3, 0.25, n)))
    s1, s2 = 1 - d1, 1 - d2
    best = (np.arange(n) + 1) % n
    rows = rng.choice(n, copies, replace=False)
    s1[rows] = rng.uniform(0.93, 0.96, copies)
    s2[rows] = 1 - np.exp(rng.normal(np.log(0.45), 0.2, copies))
    return table(np.clip(s1, -1, 1), np.clip(s2, -1, 1), best), rows, (s1, s2)


def test_the_threshold_is_the_fitted_tail_of_the_data_own_gaps() -> None:
    nb, _, (s1, s2) = crowded(0)
    train = np.ones(len(s1), bool)
    got = standout.fit(standout.gaps(nb)[2], train)
    assert isinstance(got, dict)
    gap = np.log(np.clip(1 - s1.astype(np.float32), 1e-6, None)) - np.log(
        np.clip(1 - s2.astype(np.float32), 1e-6, None))
    mu = np.median(gap)
    sd = 1.4826 * np.median(np.abs(gap - mu))
    assert got["gap"] == pytest.approx(mu - 3.09 * sd, abs=1e-4)
    assert got["ratio"] == pytest.approx(np.exp(mu - 3.09 * sd), rel=1e-3)
    assert got["samples"] == len(s1)
    assert "too few" in str(standout.fit(standout.gaps(nb)[2], np.arange(len(s1)) < 5))


def test_copies_that_stand_out_are_found_where_the_floor_is_above_them() -> None:
    nb, rows, (s1, _) = crowded(1)
    train = np.ones(len(s1), bool)
    floor = summary.natural_likeness({"detail": s1})["detail"]
    assert floor > 0.96  # the crowded data's own floor: every copy is below it
    assert not (s1[rows] >= floor).any()
    found, info, ok = standout.apply([], nb, {"threshold": 0.9,
                                              "copy_similarity": {"p1": 0.9}}, train)
    pairs = {(a, b) for a, b, _, how in found if how == "standout"}
    want = {(min(int(r), (int(r) + 1) % len(s1)), max(int(r), (int(r) + 1) % len(s1)))
            for r in rows}
    assert want <= pairs  # every planted copy
    assert len(pairs - want) <= 0.003 * len(s1) + 2  # about the fitted 0.1 % of the rest
    assert info["added"] == len(pairs) and info["floor"] == 0.9
    # the rows passed: best at least the floor, gap at most the fitted one (computed here)
    s1_, s2_ = nb.dt_sim[:, 0].astype(np.float64), nb.dt_sim[:, 1].astype(np.float64)
    gap = np.log(np.clip(1 - s1_, 1e-6, None)) - np.log(np.clip(1 - s2_, 1e-6, None))
    assert (ok == ((s1_ >= 0.9) & (gap <= info["gap"]))).all()
    assert info["counted_rate"] == pytest.approx(ok.mean(), abs=1e-5)
    assert "counts as a copy too" in info["note"]
    # a pair the other signals found already keeps how it was found; order as summary.pairs
    r = int(rows[0])
    a, b = min(r, (r + 1) % len(s1)), max(r, (r + 1) % len(s1))
    again, _, _ = standout.apply([(a, b, 0.99, "aligned")], nb,
                                 {"threshold": 0.9, "copy_similarity": {"p1": 0.9}}, train)
    assert (a, b, 0.99, "aligned") in again and again[0][2] >= again[-1][2]
    assert sum(1 for p in again if (p[0], p[1]) == (a, b)) == 1


def test_below_the_copies_floor_or_without_detail_nothing_is_added() -> None:
    nb, rows, (s1, _) = crowded(2)
    train = np.ones(len(s1), bool)
    found, info, _ = standout.apply([], nb, {"threshold": 0.99,
                                             "copy_similarity": {"p1": 0.97}}, train)
    n = len(s1)
    planted = {(min(int(r), (int(r) + 1) % n), max(int(r), (int(r) + 1) % n)) for r in rows}
    assert info["floor"] == 0.97 and not {(a, b) for a, b, *_ in found} & planted
    bare = Neighbors(idx=nb.idx, y=nb.y, nbr=nb.nbr, sim=nb.sim, nonfinite=nb.nonfinite)
    found, info, ok = standout.apply([], bare, {"threshold": 0.9,
                                                "copy_similarity": {"p1": 0.9}}, train)
    assert (found, info, ok.any()) == ([], {"note": "no fine-detail signal in use"}, False)
    unused = standout.apply([], nb, {"threshold": None, "copy_similarity": {"p1": 0.9}},
                            train)
    assert unused[0] == [] and "no fine-detail" in unused[1]["note"] and not unused[2].any()


def test_the_false_leak_rates_add_the_rule() -> None:
    """The leak call's counted rate counts a training sample whose best stands out; its
    fitted rate adds the rule's fitted tail (a union bound)."""
    nb, _, (s1, _) = crowded(3)
    where = {int(i): "train" for i in nb.idx}
    labels = np.zeros(len(s1), np.int64)
    thr: dict[str, float | None] = {"features": 0.999, "detail": 0.999}
    plain = summary.false_leak_rate(nb, thr, where, labels, None)
    mask = np.zeros(len(s1), bool)
    mask[:100] = True
    more = summary.false_leak_rate(nb, thr, where, labels, None, None, (mask, 0.001))
    assert more["rate"] == pytest.approx(float(
        (mask | (s1 >= 0.999)).mean()), abs=1e-4)
    assert more["fitted_rate"] == pytest.approx(plain["fitted_rate"] + 0.001, abs=1e-5)
