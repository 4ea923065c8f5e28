"""Speech: does a pretrained audio encoder beat handcrafted features? Spoken-digit and speaker
recognition on the Free Spoken Digit Dataset (FSDD, Zohar Jackson et al., CC BY-SA 4.0).

For each backbone (``resemblyzer``: the GE2E speaker encoder; ``mfcc``: the handcrafted
baseline) one featurefleet job extracts the clips' features on a private Redis + real worker
processes (a manifest of the clips, labelled by digit; the job's own linear probe is the "all
labels" digit row). The same stored features are then read back from the job's HDF5 shards and
scored with a standardized logistic regression (C=1) for both tasks:

- digits and speakers with 1, 2, 5 labelled training clips per class (mean +- sd over draws)
  and with every training clip; train = takes 5..T-1, test = takes 0..4 (FSDD's convention);
- digits leave-one-speaker-out (train on five speakers, test on the sixth, every take < T).

    .venv/bin/python benchmarks/speech.py [--fsdd ../shared/data/fsdd] [--takes 20] [--draws 10]

With ``--finetune-epochs N`` (default 6) resemblyzer is also fine-tuned end to end with every
training label of each task (one job per task; the job's validation split picks the epoch), and
with 2 and 5 labelled clips per class (``--finetune-few``; one of them validates, 3 draws, 30
epochs).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.jobs import run_job
from pipeline.spec import JobSpec
from pipeline.store.shards import read_shard
from workers.launcher import local_cluster

NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def write_manifest(fsdd: Path, takes: int, out: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A manifest of the recordings with take < ``takes`` (label: the digit; split: test for
    takes 0..4), beside copies of them under ``out`` (a manifest reads only its own folder)."""
    import shutil

    rows = []
    (out / "recordings").mkdir(exist_ok=True)
    for path in sorted((fsdd / "recordings").glob("*.wav")):
        m = NAME.match(path.name)
        if m and int(m.group(3)) < takes:
            if not (out / "recordings" / path.name).exists():
                shutil.copyfile(path, out / "recordings" / path.name)
            rows.append({"path": f"recordings/{path.name}", "digit": m.group(1),
                         "speaker": m.group(2), "take": int(m.group(3)),
                         "split": "test" if int(m.group(3)) < 5 else "train"})
    manifest = out / "fsdd.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows([(r["path"], r["digit"], r["split"]) for r in rows])
    return manifest, rows


def features_of(rep: dict[str, Any], n: int) -> np.ndarray:
    """The job's stored features in manifest order (rows of skipped clips stay NaN)."""
    out: np.ndarray | None = None
    for s in rep["shards"]:
        shard = read_shard(s["path"])
        if out is None:
            out = np.full((n, shard.features.shape[1]), np.nan, np.float32)
        out[shard.indices] = shard.features
    assert out is not None
    return out


def logistic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
             y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    clf.fit(x_train, y_train)
    return float((clf.predict(x_test) == y_test).mean())


def few_labels(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
               per_class: int | None, draws: int) -> tuple[float, float]:
    if per_class is None:
        acc = logistic(x[train], y[train], x[test], y[test])
        return acc, 0.0
    scores = []
    for d in range(draws):
        rng = np.random.default_rng(d)
        pick = np.concatenate([rng.choice(train[y[train] == c], per_class, replace=False)
                               for c in np.unique(y[train])])
        scores.append(logistic(x[pick], y[pick], x[test], y[test]))
    return float(np.mean(scores)), float(np.std(scores))


def finetune_row(broker: str, out: Path, rows: list[dict[str, Any]], task: str,
                 epochs: int, per_class: int | None = None, draw: int = 0) -> dict[str, Any]:
    """resemblyzer fine-tuned end to end for ``task`` with every training label, or with
    ``per_class`` labelled clips per class (drawn with seed ``draw``; one of them is the
    validation clip that picks the epoch); test = takes 0..4."""
    label = "digit" if task == "digits" else "speaker"
    keep = [r for r in rows if r["split"] == "test"]
    if per_class is None:
        keep += [r for r in rows if r["split"] == "train"]
    else:
        rng = np.random.default_rng(draw)
        for c in sorted({r[label] for r in rows}):
            pool = [r for r in rows if r["split"] == "train" and r[label] == c]
            picked = [pool[int(i)] for i in rng.choice(len(pool), per_class, replace=False)]
            keep += [{**r, "split": "val" if k == 0 else "train"}
                     for k, r in enumerate(picked)]
    manifest = out / f"fsdd-{task}-{per_class or 'all'}-{draw}.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows([(r["path"], r[label], r["split"]) for r in keep])
    spec = JobSpec.from_dict({
        "name": f"speech-finetune-{task}", "data": {"source": "manifest", "path": str(manifest),
                                                    "shard_size": 200},
        "backbone": {"name": "resemblyzer"}, "strategy": "finetune",
        "finetune": {"epochs": epochs, "lr": 3e-2, "backbone_lr_mult": 0.03,
                     "batch_size": min(32, sum(r["split"] == "train" for r in keep))},
        "quality": {"enabled": False}, "output": str(out / "jobs"), "store": str(out / "store")})
    t0 = time.perf_counter()
    _st, rep = run_job(spec, broker)
    return {"test_top1": rep["metrics"]["top1"], "epochs": epochs,
            "best_epoch": rep["train"]["finetune"].get("best_epoch"),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fsdd", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "fsdd"))
    ap.add_argument("--takes", type=int, default=20, help="recordings per speaker and digit")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--backbones", default="resemblyzer,mfcc")
    ap.add_argument("--out", default=None)
    ap.add_argument("--finetune-epochs", type=int, default=6,
                    help="also fine-tune resemblyzer with every label (0: skip)")
    ap.add_argument("--finetune-few", default="2,5",
                    help="and with this many labelled clips per class (one validates)")
    ap.add_argument("--finetune-draws", type=int, default=3)
    ap.add_argument("--few-epochs", type=int, default=30)
    args = ap.parse_args()
    fsdd = Path(args.fsdd)
    if not (fsdd / "recordings").is_dir():
        raise SystemExit(f"no FSDD at {fsdd}; fix: --fsdd PATH (a clone of "
                         "free-spoken-digit-dataset)")
    out = Path(args.out or tempfile.mkdtemp(prefix="ff-speech-"))
    out.mkdir(parents=True, exist_ok=True)
    manifest, rows = write_manifest(fsdd, args.takes, out)
    digit = np.array([int(r["digit"]) for r in rows])
    speakers = sorted({r["speaker"] for r in rows})
    speaker = np.array([speakers.index(r["speaker"]) for r in rows])
    train = np.flatnonzero(np.array([r["split"] == "train" for r in rows]))
    test = np.flatnonzero(np.array([r["split"] == "test" for r in rows]))
    results: dict[str, Any] = {"clips": len(rows), "train": len(train), "test": len(test),
                               "speakers": speakers, "backbones": {}}
    with local_cluster(out / "cluster", extract_workers=1) as cluster:
        for name in args.backbones.split(","):
            spec = JobSpec.from_dict({
                "name": f"speech-{name}", "data": {"source": "manifest", "path": str(manifest),
                                                   "shard_size": 200},
                "backbone": {"name": name}, "quality": {"enabled": False},
                "output": str(out / "jobs"), "store": str(out / "store")})
            t0 = time.perf_counter()
            _st, rep = run_job(spec, cluster.broker)
            x = features_of(rep, len(rows))
            ok = np.isfinite(x).all(axis=1)
            tr, te = train[ok[train]], test[ok[test]]
            row: dict[str, Any] = {
                "job_seconds": round(time.perf_counter() - t0, 1),
                "extract_s": rep["timings"].get("extract_s"),
                "job_probe_digits_top1": rep["metrics"]["top1"], "skipped": int((~ok).sum())}
            for task, y in (("digits", digit), ("speakers", speaker)):
                for k in (1, 2, 5, None):
                    mean, sd = few_labels(x, y, tr, te, k, args.draws)
                    row[f"{task}@{k or 'all'}"] = [round(mean, 4), round(sd, 4)]
            loso = []
            for s in range(len(speakers)):
                held = ok & (speaker == s)
                rest = ok & (speaker != s)
                loso.append(logistic(x[rest], digit[rest], x[held], digit[held]))
            row["digits_leave_one_speaker_out"] = [round(float(np.mean(loso)), 4),
                                                   round(float(np.std(loso)), 4)]
            results["backbones"][name] = row
            print(json.dumps({name: row}), flush=True)
        if args.finetune_epochs:
            results["finetuned"] = {}
            for task in ("digits", "speakers"):
                results["finetuned"][task] = finetune_row(
                    cluster.broker, out, rows, task, args.finetune_epochs)
                print(json.dumps({f"finetuned resemblyzer, {task}":
                                  results["finetuned"][task]}), flush=True)
                for k in [int(v) for v in args.finetune_few.split(",") if v]:
                    got = [finetune_row(cluster.broker, out, rows, task, args.few_epochs, k, d)
                           for d in range(args.finetune_draws)]
                    acc = [g["test_top1"] for g in got]
                    results["finetuned"][f"{task}@{k}"] = {
                        "test_top1": [round(float(np.mean(acc)), 4),
                                      round(float(np.std(acc)), 4)],
                        "draws": len(acc), "epochs": args.few_epochs,
                        "seconds": round(sum(g["seconds"] for g in got), 1)}
                    print(json.dumps({f"finetuned resemblyzer, {task}@{k}":
                                      results["finetuned"][f"{task}@{k}"]}), flush=True)
    (out / "speech.json").write_text(json.dumps(results, indent=2))
    cols = [f"{t}@{k}" for t in ("digits", "speakers") for k in (1, 2, 5, "all")]
    print("\n| backbone | " + " | ".join(cols) + " | digits LOSO | extract s |")
    print("|---" * (len(cols) + 3) + "|")
    for name, row in results["backbones"].items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if row[c][1] else f"{row[c][0]:.3f}"
                 for c in cols]
        loso = row["digits_leave_one_speaker_out"]
        print(f"| {name} | " + " | ".join(cells) + f" | {loso[0]:.3f} ± {loso[1]:.3f} | "
              f"{row['extract_s']} |")
    for task, r in results.get("finetuned", {}).items():
        acc = r["test_top1"]
        shown = f"{acc[0]:.3f} ± {acc[1]:.3f}" if isinstance(acc, list) else f"{acc:.3f}"
        print(f"resemblyzer fine-tuned, {task if '@' in task else task + '@all'}: test top-1 "
              f"{shown} ({r['epochs']} epochs, {r['seconds']} s)")
    print(f"\n{len(rows)} clips ({len(train)} train, {len(test)} test); results in "
          f"{out / 'speech.json'}")


if __name__ == "__main__":
    main()
