"""Cold-start recommendation with transferred content features — on SIMULATED users, through
the product (``kind: recommend`` jobs on a private Redis + real worker processes).

No interaction data set with a redistributable licence installs offline, so the interactions
are simulated (and labelled so everywhere; ``pipeline/client/recommending.py``): the items are
real — Debian packages, their descriptions as item text — and each simulated user prefers a few
hidden topics (the packages' Debian sections, which no model sees) mixed with item popularity.

The same interactions and split (20 % of the items cold: every interaction held out; the last
20 % of the rest by time, one cut for everybody) with two content backbones: all-MiniLM-L6-v2
(pretrained, transferred) and TF-IDF (the handcrafted baseline, fitted on the item texts).
Models: random, popularity, EASE (warm), content kNN, content -> CF factors (cold). Recall@K,
NDCG@K per user, coverage; warm and cold apart.

    .venv/bin/python benchmarks/recommend.py [--items-per-section 150] [--users 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.jobs import run_job
from pipeline.client.recommending import write_simulated
from workers.launcher import local_cluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items-per-section", type=int, default=150)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ff-recommend-"))
    items, inter = write_simulated(out / "data", args.items_per_section, args.users, args.seed)
    backbones = {"all-MiniLM-L6-v2 (pretrained)": {"name": "all-minilm-l6-v2",
                                                   "max_length": 128},
                 "TF-IDF (handcrafted)": {"name": "tfidf"}}
    reports: dict[str, Any] = {}
    with local_cluster(out / "cluster", extract_workers=1) as c:
        for label, backbone in backbones.items():
            _, rep = run_job({"name": f"recommend-{backbone['name']}", "kind": "recommend",
                              "data": {"source": "text", "path": str(items),
                                       "shard_size": 600, "seed": args.seed},
                              "backbone": backbone,
                              "recommend": {"interactions": str(inter),
                                            "items_id_column": "package"},
                              "output": str(out / "jobs"), "store": str(out / "store")},
                             c.broker)
            reports[label] = rep
    first = next(iter(reports.values()))
    i = first["interactions"]
    print(f"SIMULATED users on real items: {first['data']['items']} Debian packages "
          f"({i['cold_items']} cold), {i['users']} users, {i['kept']:,} interactions, "
          f"{i['split']} split (train {i['train']:,}, warm test {i['warm_test']:,}, cold test "
          f"{i['cold_test']:,})")
    rows: dict[str, dict[str, dict[str, Any]]] = {"warm": {}, "cold": {}}
    for label, rep in reports.items():
        for part in ("warm", "cold"):
            for model, m in rep["recommend"]["results"][part].items():
                content = model.startswith("content")
                name = f"{model}, {label}" if content else model
                if content or label == next(iter(reports)):
                    rows[part][name] = m
    for part in ("warm", "cold"):
        print(f"\n| {part} items | Recall@10 | Recall@20 | NDCG@20 | coverage@20 |")
        print("|---|---|---|---|---|")
        for name, m in sorted(rows[part].items(), key=lambda kv: -kv[1]["recall@20"]):
            print(f"| {name} | {m['recall@10']:.4f} | {m['recall@20']:.4f} | "
                  f"{m['ndcg@20']:.4f} | {m['coverage@20']:.3f} |")
    cold = rows["cold"]
    pop = max(cold["popularity"]["recall@20"], 1e-9)
    knn = cold["content kNN, all-MiniLM-L6-v2 (pretrained)"]["recall@20"]
    warm = rows["warm"]
    print(f"\ncold Recall@20, MiniLM content kNN / popularity: {knn / pop:.1f}x (target >= 2x);"
          f" warm EASE {warm['EASE (collaborative)']['recall@20']:.4f} vs popularity "
          f"{warm['popularity']['recall@20']:.4f} (target: EASE >= popularity)")
    (out / "recommend.json").write_text(json.dumps({"simulated": True, "rows": rows,
                                                    "interactions": i}, indent=2))
    print(f"results in {out / 'recommend.json'}")


if __name__ == "__main__":
    main()
