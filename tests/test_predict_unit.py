"""Batch prediction's parts without workers: guessing the source of a path, and the writer of
predictions (Parquet and CSV agree, top-k order, error rows, the summary's counts, nothing
published on failure)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.predict import BatchWriter
from pipeline.sources import guess_source


def test_guess_source_of_a_path(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    for c in ("cat", "dog"):
        (tmp_path / "classes" / c).mkdir(parents=True)
    (tmp_path / "t.csv").write_text("text\nhi\n")
    (tmp_path / "w.tar").write_bytes(b"")
    (tmp_path / "x.bin").write_bytes(b"")
    assert guess_source(str(tmp_path / "flat")) == "images"
    assert guess_source(str(tmp_path / "classes")) == "imagefolder"
    assert guess_source(str(tmp_path / "classes"), "text") == "text"
    assert guess_source(str(tmp_path / "classes"), "audio") == "audiofolder"
    assert guess_source(str(tmp_path / "flat"), "audio") == "audio"
    assert guess_source(str(tmp_path / "t.csv")) == "manifest"
    assert guess_source(str(tmp_path / "t.csv"), "text") == "text"
    assert guess_source(str(tmp_path / "w.tar")) == "webdataset"
    assert guess_source("digits") == "digits"
    with pytest.raises(DataError, match=r"x\.bin.*--source"):
        guess_source(str(tmp_path / "x.bin"))
    with pytest.raises(DataError, match="does not exist"):
        guess_source(str(tmp_path / "nope"))


def test_batch_writer_files_agree_and_the_summary_counts(tmp_path: Path) -> None:
    import pandas as pd

    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "=cmd"]
    w = BatchWriter(tmp_path, names, top=3, low_confidence=0.5, given_names=["a", "b"])
    total = 0
    for block in range(3):
        logits = rng.normal(size=(50, 4)) * 3
        proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        ids = [f"s{block}-{i}" for i in range(50)]
        w.add(ids, np.arange(total, total + 50), proba, rng.integers(0, 2, 50))
        total += 50
    w.add_errors([{"id": "bad.png", "reason": "OSError: truncated"}])
    assert not (tmp_path / "predictions.parquet").exists()  # published only by close
    s = w.close()
    table = pd.read_parquet(s["files"]["parquet"])
    rows = list(csv.DictReader(Path(s["files"]["csv"]).read_text().splitlines()))
    assert len(table) == len(rows) == 151 and s["predicted"] == 150 and s["failed"] == 1
    assert list(table["sample_id"]) == [r["sample_id"] for r in rows]
    ok = table[table["error"].isna()]
    assert (ok["probability"] >= ok["probability_2"]).all()
    assert (ok["probability_2"] >= ok["probability_3"]).all()
    counts = ok["predicted"].value_counts().to_dict()
    assert s["class_counts"] == {k: int(v) for k, v in counts.items()}
    assert s["low_confidence"]["count"] == int((ok["probability"] < 0.5).sum())
    agree = (ok["predicted"] == ok["given_label"]).sum()
    assert s["given_labels"] == {"samples": 150, "agree": int(agree),
                                 "share": round(agree / 150, 4)}
    assert min(r["probability"] for r in s["least_confident"]) == pytest.approx(
        ok["probability"].min(), abs=1e-4)
    bad = table[table["sample_id"] == "bad.png"].iloc[0]
    assert bad["index"] == -1 and bad["error"] == "OSError: truncated"
    formula = [r for r in rows if r["predicted"] == "'=cmd"]  # CSV: a formula is text
    assert len(formula) == counts.get("=cmd", 0)


def test_batch_writer_abort_publishes_nothing(tmp_path: Path) -> None:
    w = BatchWriter(tmp_path, ["a", "b"], top=2, low_confidence=0.5)
    w.add(["x"], np.array([0]), np.array([[0.3, 0.7]]))
    w.abort()
    assert list(tmp_path.iterdir()) == []
