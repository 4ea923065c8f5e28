"""Batch prediction on the fleet (``kind: predict`` / ``featurefleet predict MODEL --data``):
a trained head over every sample of a data source, sharded over the extraction workers, with
stored features reused, predictions in Parquet and CSV, errors for unreadable inputs, and
the answers checked against the classifier called directly on the same files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import submit
from pipeline.errors import SpecError
from pipeline.spec import JobSpec
from workers.launcher import LocalCluster

pytestmark = pytest.mark.integration


def _digit_folder(root: Path, classes: tuple[int, ...], per_class: int, offset: int = 0,
                  flat: bool = False) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    written = []
    for c in classes:
        rows = np.flatnonzero(d.target == c)[offset: offset + per_class]
        folder = root if flat else root / f"digit{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in rows:
            im = Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8))
            path = folder / f"d{i:04d}.png"
            im.resize((32, 32)).save(path)
            written.append(path)
    return written


def _spec(out: Path, data: dict[str, object], **extra: object) -> JobSpec:
    return JobSpec.from_dict({
        "name": "batch", "data": {"shard_size": 48, **data}, "quality": {"enabled": False},
        "backbone": {"name": "efficientnet_lite0", "image_size": 32},
        "probe": {"heads": ["linear", "knn"]}, "output": str(out), **extra})


def test_batch_prediction_reuses_features_and_matches_the_classifier(
        cluster: LocalCluster, tmp_path: Path) -> None:
    from pipeline.predict import load_classifier

    train_dir = tmp_path / "train"
    _digit_folder(train_dir, (0, 1, 7), 30)
    out = tmp_path / "out"
    trained = submit(_spec(out, {"source": "imagefolder", "path": str(train_dir)}),
                     broker=cluster.broker)
    assert trained.wait(timeout=300)["status"] == "SUCCESS"
    model = out / "jobs" / trained.id

    # 1. the training data again: every feature comes from the store, and on the test split
    # the batch answers are the training job's own test predictions
    again = submit(_spec(out, {"source": "imagefolder", "path": str(train_dir)},
                         kind="predict", predict={"model": trained.id}),
                   broker=cluster.broker)
    st = again.wait(timeout=300)
    assert st["status"] == "SUCCESS", st.get("error")
    assert st["shards_cached"] == st["shards_total"] > 0  # nothing extracted again
    rep = again.result()
    assert rep["kind"] == "predict" and rep["timings"]["extract_images"] == 0
    s = rep["predictions"]
    assert s["predicted"] == 90 and s["failed"] == 0
    assert sum(s["class_counts"].values()) == 90
    with open(model / "predictions.csv") as fh:  # the training job's test predictions
        test_pred = {r["sample_id"]: r for r in csv.DictReader(fh)}
    import pandas as pd

    table = pd.read_parquet(s["files"]["parquet"])
    assert len(table) == 90 and list(table.columns[:4]) == [
        "sample_id", "index", "predicted", "probability"]
    mine = table.set_index("sample_id")
    for sid, r in test_pred.items():
        assert mine.loc[sid, "predicted"] == r["predicted"], sid
        assert abs(mine.loc[sid, "probability"] - float(r["probability"])) < 1e-4
    agree = (table["predicted"] == table["given_label"]).mean()
    assert s["given_labels"]["share"] == pytest.approx(agree, abs=1e-4)
    assert (table["probability"] >= table["probability_2"]).all()
    low = int((table["probability"] < 0.5).sum())
    assert s["low_confidence"]["count"] == low
    csv_rows = list(csv.DictReader(Path(s["files"]["csv"]).read_text().splitlines()))
    assert [r["sample_id"] for r in csv_rows] == list(table["sample_id"])

    # 2. new, unlabeled files through the command line, one unreadable: a row with its error;
    # every other answer is what the classifier gives on the same file, called directly
    new = tmp_path / "new"
    files = _digit_folder(new, (0, 1, 7), 5, offset=40, flat=True)
    (new / "broken.png").write_bytes(b"\x89PNG not really")
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", str(model), "--data", str(new),
         "--head", "knn", "--top", "2", "--wait", "--broker", cluster.broker],
        capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "predicted       15 samples; 1 could not be read" in cli.stdout, cli.stdout
    page = next(line for line in cli.stdout.splitlines() if line.startswith("page:"))
    html = Path(page.split(None, 1)[1]).read_text()
    assert "broken.png" in html and "Least confident" in html
    table = pd.read_parquet(Path(page.split(None, 1)[1]).with_name("predictions.parquet"))
    assert len(table) == 16 and list(table.columns) == [
        "sample_id", "index", "predicted", "probability", "top_2", "probability_2",
        "given_label", "error"]
    broken = table[table["sample_id"] == "broken.png"].iloc[0]
    assert pd.isna(broken["predicted"]) and "cannot identify" in broken["error"]
    clf = load_classifier(model / "head-knn.pt")
    direct = clf.predict([str(f) for f in files], top=2)
    by_id = table.set_index("sample_id")
    for f, r in zip(files, direct, strict=True):
        assert by_id.loc[f.name, "predicted"] == r["label"]
        assert by_id.loc[f.name, "probability"] == pytest.approx(r["probability"], abs=1e-4)
    assert by_id["given_label"].isna().all()  # a flat folder has no labels


def test_batch_prediction_with_a_fine_tuned_network(cluster: LocalCluster,
                                                    tmp_path: Path) -> None:
    """A fine-tuned network is split once into a backbone weights file and its last layer;
    on the fleet it answers what the network answers when called directly."""
    import pandas as pd

    from pipeline.predict import load_classifier

    train_dir, new = tmp_path / "train", tmp_path / "new"
    _digit_folder(train_dir, (0, 1, 7), 20)
    files = _digit_folder(new, (0, 1, 7), 4, offset=40, flat=True)
    out = tmp_path / "out"
    ft = submit(_spec(out, {"source": "imagefolder", "path": str(train_dir)},
                      strategy="finetune", finetune={"epochs": 1, "batch_size": 16}),
                broker=cluster.broker)
    assert ft.wait(timeout=400)["status"] == "SUCCESS"
    job = submit(_spec(out, {"source": "images", "path": str(new)}, kind="predict",
                         predict={"model": str(out / "jobs" / ft.id)}), broker=cluster.broker)
    st = job.wait(timeout=300)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    assert rep["model"]["head"] == "finetuned" and rep["predictions"]["predicted"] == 12
    assert rep["backbone"]["weights_id"] == "encoder.pt"  # the fine-tuned backbone's weights
    table = pd.read_parquet(rep["predictions"]["files"]["parquet"]).set_index("sample_id")
    direct = load_classifier(out / "jobs" / ft.id).predict([str(f) for f in files])
    for f, r in zip(files, direct, strict=True):  # stored float16 features: tiny differences
        assert table.loc[f.name, "probability"] == pytest.approx(r["probability"], abs=0.02)
        near_tie = r["top"][0]["probability"] - r["top"][1]["probability"] < 0.02
        assert table.loc[f.name, "predicted"] == r["label"] or near_tie


def test_batch_prediction_refuses_what_it_cannot_use(cluster: LocalCluster,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = {"source": "digits", "limit": 60}
    for predict, words in [({}, "predict.model.*is not set"),
                           ({"model": str(tmp_path / "nowhere")}, "neither a job folder"),
                           ({"model": "0123456789ab"}, "neither a job folder")]:
        with pytest.raises(SpecError, match=words):
            submit(_spec(out, data, kind="predict", predict=predict), broker=cluster.broker)
    quality = submit(_spec(out, data, kind="quality"), broker=cluster.broker)
    assert quality.wait(timeout=300)["status"] == "SUCCESS"
    with pytest.raises(SpecError, match="is a quality job"):
        submit(_spec(out, data, kind="predict", predict={"model": quality.id}),
               broker=cluster.broker)
    probe = submit(_spec(out, data, probe={"heads": ["linear"]}), broker=cluster.broker)
    assert probe.wait(timeout=300)["status"] == "SUCCESS"
    with pytest.raises(SpecError, match=r"predict.head.*trained no 'mlp' head"):
        submit(_spec(out, data, kind="predict", predict={"model": probe.id, "head": "mlp"}),
               broker=cluster.broker)
    text = tmp_path / "texts.csv"
    text.write_text("text\nhello there\n")
    with pytest.raises(SpecError, match="the data is text"):
        submit(_spec(out, {"source": "text", "path": str(text)}, kind="predict",
                     predict={"model": probe.id}), broker=cluster.broker)
    # nothing was enqueued or written for the refused ones
    assert {p.name for p in (out / "jobs").iterdir()} == {quality.id, probe.id}
