"""Recommendation (``kind: recommend``): the metrics and EASE against independent
computations, a split that cannot leak (cold items, one time cut), bad interaction tables
(unknown items, duplicates, missing or non-integer ids, too many rows), the MovieLens layout,
and a whole job through real worker processes whose numbers are recomputed here."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import DataError, FeaturefleetError
from pipeline.planner.interactions import COLD, TRAIN, WARM, read, split
from pipeline.recommend import ease, evaluate, matrix
from pipeline.spec import JobSpec, RecommendSpec

TOPICS = {"astro": "telescope star galaxy orbit planet comet nebula",
          "audio": "sound music synth mixer audio speaker record",
          "chem": "molecule atom reaction bond acid crystal polymer",
          "games": "game player level puzzle arcade score quest"}


def write_items(path: Path, per_topic: int = 30, seed: int = 0) -> list[str]:
    """An items table: ``item`` id and ``text`` of one topic's words (the hidden topic)."""
    rng = np.random.default_rng(seed)
    names = []
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item", "text", "label"])
        for t, words in TOPICS.items():
            vocab = words.split()
            for k in range(per_topic):
                name = f"{t}-{k}"
                names.append(name)
                w.writerow([name, " ".join(rng.choice(vocab, 6)) + f" tool {k}", t])
    return names


def write_interactions(path: Path, names: list[str], users: int = 120, seed: int = 0,
                       extra: list[list[Any]] | None = None) -> None:
    """Each user likes one topic: 10 items of it at increasing times."""
    rng = np.random.default_rng(seed)
    topics = sorted(TOPICS)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        for u in range(users):
            t = topics[u % len(topics)]
            mine = [n for n in names if n.startswith(t)]
            for k, i in enumerate(rng.choice(len(mine), 10, replace=False)):
                w.writerow([f"u{u}", mine[i], 1000 * k + u])  # users interleaved in time
        for row in extra or []:
            w.writerow(row)


def spec_for(tmp_path: Path, **recommend: Any) -> JobSpec:
    return JobSpec.from_dict({
        "name": "rec", "kind": "recommend",
        "data": {"source": "text", "path": str(tmp_path / "items.csv"), "shard_size": 60},
        "backbone": {"name": "tfidf"},
        "recommend": {"interactions": str(tmp_path / "inter.csv"), **recommend},
        "output": str(tmp_path / "out")})


def test_metrics_and_ease_match_independent_computations() -> None:
    rng = np.random.default_rng(0)
    users, items = 30, 12
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, users, 150),
                                               rng.integers(0, items, 150), strict=True)}
    u, i = np.asarray(sorted(pairs)).T
    x = matrix(u, i, users, items)
    scores = rng.random((users, items)).astype(np.float32)
    truth = [set(rng.choice(items, 2, replace=False).tolist()) if n % 3 else set()
             for n in range(users)]
    got = evaluate(lambda b: scores[b], x, truth, np.arange(items), (3,))
    recalls, ndcgs = [], []
    dense = x.toarray()
    for n, t in enumerate(truth):
        if not t:
            continue
        order = [j for j in np.argsort(-scores[n]) if not dense[n, j]][:3]
        hit = [1.0 if j in t else 0.0 for j in order]
        recalls.append(sum(hit) / min(len(t), 3))
        ndcgs.append(sum(h / np.log2(r + 2) for r, h in enumerate(hit))
                     / sum(1 / np.log2(r + 2) for r in range(min(len(t), 3))))
    assert got["recall@3"] == pytest.approx(np.mean(recalls), abs=1e-4)
    assert got["ndcg@3"] == pytest.approx(np.mean(ndcgs), abs=1e-4)
    assert got["users"] == len(recalls)
    # EASE: B = I - P diag(1/diag P), P = (X'X + lambda I)^-1, zero diagonal
    warm = np.arange(items)
    b = ease(x, warm, 5.0)
    p = np.linalg.inv(dense.T @ dense + 5.0 * np.eye(items))
    want = np.eye(items) - p / np.diag(p)[None, :]
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(b, want, atol=1e-4)


def test_the_split_cannot_leak_and_bad_rows_are_recorded(tmp_path: Path) -> None:
    names = write_items(tmp_path / "items.csv")
    write_interactions(tmp_path / "inter.csv", names, extra=[
        ["u0", "no-such-item", 5], ["u0", names[0], 7], ["u0", names[0], 8],  # unknown, dups
        ["", names[1], 9], ["u-once", names[2], 3]])
    spec = spec_for(tmp_path)
    arrays, summary = read(spec, names)
    assert summary["left_out"]["unknown_item"] == 1 and summary["unknown_items"] == \
        ["no-such-item"]
    assert summary["left_out"]["missing_id"] == 1
    assert summary["left_out"]["duplicate"] >= 1  # u0 x names[0] at most once
    pairs = list(zip(arrays["user"].tolist(), arrays["item"].tolist(), strict=True))
    assert len(pairs) == len(set(pairs))
    part, s = split(arrays, len(names), spec.recommend, seed=0)
    assert s["split"] == "time"  # a time column: one cut for everybody
    t = arrays["time"]
    assert t[part == TRAIN].max() < s["cut_time"] <= t[part == WARM].min()
    cold = np.unique(arrays["item"][part == COLD])
    assert len(cold) == round(0.2 * len(np.unique(arrays["item"])))
    assert not np.isin(arrays["item"][part != COLD], cold).any()  # never trained on
    rnd, r = split(arrays, len(names), RecommendSpec(split="random"), seed=0)
    once = arrays["user"][arrays["item"] == names.index(names[2])]
    counts = np.bincount(arrays["user"][rnd != COLD])
    assert all(rnd[(arrays["user"] == u) & (rnd != COLD)].max() == TRAIN
               for u in np.flatnonzero(counts == 1))  # a lone interaction only trains
    assert r["split"] == "random" and r["one_interaction_users"] >= 1 and len(once)


@pytest.mark.parametrize(("rows", "suffix", "match"), [
    ("user,item\nu1,1.5\n", ".csv", None),  # a CSV cell is a string id: fine
    ('{"user": "u1", "item": 1.5}\n', ".jsonl", r"'item' is 1\.5, not a string or integer"),
    ('{"user": ["a"], "item": "x"}\n', ".jsonl", r"'user' is \['a'\], not a string"),
    ("who,item\nu1,x\n", ".csv", r"no column 'user'.*recommend.user_column"),
    ("user,item,timestamp\nu1,x,yesterday\n", ".csv", r"'timestamp' is 'yesterday', not a time"),
    ("user,item\n", ".csv", r"no interaction of .* names an item|has no rows"),
])
def test_bad_interaction_tables_get_one_line_errors(tmp_path: Path, rows: str, suffix: str,
                                                    match: str | None) -> None:
    names = write_items(tmp_path / "items.csv", per_topic=2)
    (tmp_path / f"inter{suffix}").write_text(rows)
    spec = spec_for(tmp_path).replace(recommend={"interactions": str(tmp_path /
                                                                      f"inter{suffix}")})
    if match is None:
        with pytest.raises(DataError, match=r"no interaction of .* names an item"):
            read(spec, names)  # "1.5" is no item's id: every row unknown
        return
    with pytest.raises(DataError, match=match):
        read(spec, names)


def test_too_many_rows_and_missing_tables_are_refused(tmp_path: Path) -> None:
    names = write_items(tmp_path / "items.csv")
    write_interactions(tmp_path / "inter.csv", names)
    with pytest.raises(DataError, match=r"more than 100 rows \(recommend.max_interactions\); "
                                         r"fix: sample it"):
        read(spec_for(tmp_path, max_interactions=100), names)
    with pytest.raises(DataError, match=r"needs an interactions table"):
        read(spec_for(tmp_path).replace(recommend={"interactions": None}), names)
    with pytest.raises(DataError, match=r"does not exist"):
        read(spec_for(tmp_path, interactions=str(tmp_path / "nope.csv")), names)
    with pytest.raises(DataError, match=r"split: time, but .* no column 'when'"):
        read(spec_for(tmp_path, split="time", time_column="when"), names)


def test_movielens_layout_becomes_items_and_a_recommend_section(tmp_path: Path) -> None:
    from pipeline.client.recommending import movielens

    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "movies.csv").write_text('movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n'
                                   '2,"Heat, The (1995)",Action|Crime\n')
    (ml / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,5.0,964982703\n"
                                    "1,2,3.0,964982704\n2,1,4.0,964982705\n2,2,4.5,964982706\n")
    items, section = movielens(ml, tmp_path / "out")
    with open(items, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[1] == {"movieId": "2", "text": "Heat, The (1995) (Action, Crime)"}
    spec = JobSpec.from_dict({"kind": "recommend", "data": {"source": "text", "path": str(items)},
                              "backbone": {"name": "tfidf"}, "recommend": section,
                              "output": str(tmp_path / "o")})
    _, summary = read(spec, ["1", "2"])
    assert summary["left_out"]["below_min_rating"] == 1 and summary["kept"] == 3
    with pytest.raises(FeaturefleetError, match=r"lacks ratings\.csv and movies\.csv"):
        movielens(tmp_path, tmp_path / "out2")


@pytest.mark.integration
def test_a_recommend_job_ranks_cold_items_by_content(cluster: Any, tmp_path: Path) -> None:
    from pipeline import submit
    from pipeline.recommend import load

    names = write_items(tmp_path / "items.csv")
    write_interactions(tmp_path / "inter.csv", names, extra=[["u0", "ghost", 1]])
    job = submit(spec_for(tmp_path), broker=cluster.broker)
    st = job.wait(timeout=300)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    res = rep["recommend"]["results"]
    assert rep["interactions"]["left_out"]["unknown_item"] == 1
    # users like one topic: content (TF-IDF of the item texts) finds the cold items of it
    assert res["cold"]["content kNN"]["recall@10"] > 2 * res["cold"]["popularity"]["recall@10"]
    assert res["warm"]["EASE (collaborative)"]["recall@20"] >= \
        res["warm"]["random"]["recall@20"]
    # popularity's warm Recall@20, recomputed here from the split the job wrote
    d = load(Path(st["job_dir"]) / "interactions.npz")
    tr = d["part"] == TRAIN
    pop = np.bincount(d["item"][tr], minlength=len(names)).astype(np.float32) + \
        np.random.default_rng(0).random(len(names)).astype(np.float32) * 1e-3  # its tie-break
    warm_items = np.setdiff1d(np.unique(d["item"]), np.unique(d["item"][d["part"] == COLD]))
    recalls = []
    for u in np.unique(d["user"][d["part"] == WARM]):
        held = set(d["item"][(d["user"] == u) & (d["part"] == WARM)].tolist())
        seen = set(d["item"][(d["user"] == u) & tr].tolist())
        cand = [i for i in warm_items if i not in seen]
        top = sorted(cand, key=lambda i: -pop[i])[:20]
        recalls.append(len(held & set(top)) / min(len(held), 20))
    assert res["warm"]["popularity"]["recall@20"] == pytest.approx(np.mean(recalls), abs=1e-4)
    # EASE's penalty came from the fanned-out sweep: one point per penalty
    assert [c["l2"] for c in rep["recommend"]["collaborative"]["validation"]] == \
        [30.0, 100.0, 300.0, 1000.0]
    import pyarrow.parquet as pq

    recs = pq.read_table(rep["files"]["recommendations"]).to_pylist()
    trained = {(str(d["user_names"][u]), str(d["item_names"][i]))
               for u, i in zip(d["user"][tr], d["item"][tr], strict=True)}
    warm = [r for r in recs if r["part"] == "warm"]
    assert warm and not any((r["user"], r["item"]) in trained for r in warm)
    assert {r["model"] for r in warm} == {rep["recommend"]["best"]["warm"]}
    per_user: dict[tuple[str, str], list[int]] = {}
    for r in recs:
        per_user.setdefault((r["user"], r["part"]), []).append(r["rank"])
    assert all(ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= 20
               for ranks in per_user.values())
    # what a user asks afterwards: one user's top items, on the command line
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline", "recommend", st["job_dir"], "-k", "5"]
    out = subprocess.run([*cmd, "--user", "u3", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    mine = json.loads(out.stdout)
    assert mine and [r["rank"] for r in mine if r["part"] == "warm"] == list(range(1, 6))
    assert mine == [r for r in sorted(recs, key=lambda r: (r["part"] != "warm", r["rank"]))
                    if r["user"] == "u3" and r["rank"] <= 5]
    bad = subprocess.run([*cmd, "--user", "nobody"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "user 'nobody' is not in" in bad.stderr and "fix:" in \
        bad.stderr
    html = Path(st["report"]).with_suffix(".html").read_text()
    assert 'id="cold"' in html and 'id="warm"' in html and "content kNN" in html
    assert json.loads(Path(st["report"]).read_text())["leaderboard"][0]["part"] == "warm"


def test_items_are_named_by_their_table_column_or_their_path(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.planner.interactions import item_names
    from pipeline.sources import open_source

    for name in ("shoes/red-1", "shoes/blue-2", "hats/3"):
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (len(name) * 9, 40, 90)).save(tmp_path / "imgs" /
                                                                f"{name}.png")
    spec = JobSpec.from_dict({"kind": "recommend", "data": {"source": "images",
                                                            "path": str(tmp_path / "imgs")},
                              "recommend": {"interactions": "x.csv"}})
    assert sorted(item_names(open_source(spec.data), spec)) == \
        ["hats/3", "shoes/blue-2", "shoes/red-1"]
    (tmp_path / "items.csv").write_text("sku,text,label\nA1,red shoe,s\nA2,blue hat,h\n"
                                        "A1,again,s\n")
    table = spec.replace(data={"source": "text", "path": str(tmp_path / "items.csv")},
                         recommend={"items_id_column": "sku"})
    with pytest.raises(DataError, match=r"item 'A1' appears twice.*one row per item"):
        item_names(open_source(table.data), table)
    with pytest.raises(DataError, match=r"no column 'item'.*recommend.items_id_column"):
        t2 = table.replace(recommend={"items_id_column": None})
        item_names(open_source(t2.data), t2)


def test_items_without_content_are_never_ranked_by_content_and_said_so() -> None:
    """An item whose content could not be read (no features) stays in the held-out truth but
    no model can rank it among the cold items; the result says how many."""
    from pipeline.recommend import run

    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    user = np.repeat(np.arange(n_users), 6).astype(np.int32)
    item = rng.integers(0, n_items, len(user)).astype(np.int32)
    pairs = sorted(set(zip(user.tolist(), item.tolist(), strict=True)))
    user, item = (np.asarray(c, np.int32) for c in zip(*pairs, strict=True))
    cold = np.isin(item, [0, 1, 2, 3])
    part = np.where(cold, COLD, np.where(rng.random(len(user)) < 0.2, WARM, TRAIN))
    data = {"user": user, "item": item, "part": part.astype(np.int8),
            "user_names": np.asarray([f"u{u}" for u in range(n_users)]),
            "item_names": np.asarray([f"i{i}" for i in range(n_items)])}
    feats = rng.standard_normal((n_items, 8)).astype(np.float32)
    has = np.ones(n_items, bool)
    has[[0, 1]] = False  # two cold items without content
    feats[~has] = 0.0
    out = run(data, feats, has, RecommendSpec(cf_l2=(10.0,)), seed=0)
    assert any("2 cold items have no content features" in n for n in out["notes"])
    cold_lists = out["lists"]["cold"]
    assert set(np.unique(cold_lists[1]).tolist()) <= {2, 3}  # never the featureless ones
    assert out["results"]["cold"]["content kNN"]["coverage@20"] == 1.0  # of the 2 rankable
