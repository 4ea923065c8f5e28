"""The bad-input catalogue: each case ends in one clear line naming the value and the fix (or a
recorded skip), and nothing is half-written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

from pipeline.errors import FeaturefleetError
from pipeline.planner import make_plan
from pipeline.sources import open_source
from pipeline.sources.decode import decode_image
from pipeline.spec import DataSpec, JobSpec


def _img(path: Path, size: int = 12, color: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (color, 0, 0)).save(path)


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 3) -> Path:
    for c in classes:
        for i in range(n):
            _img(root / c / f"{i}.png", color=40 * i)
    return root


def _spec(t: Path, data_: dict, **more: dict) -> dict:
    return {"data": data_, "output": str(t / "out"), **more}


def _npz(t: Path, **arrays: np.ndarray) -> str:
    np.savez(t / "a.npz", **arrays)
    return str(t / "a.npz")


def _manifest(t: Path, text: str, name: str = "m.csv") -> str:
    _folder(t / "imgs")
    (t / name).write_text(text)
    return str(t / name)


def _r18(t: Path) -> str:
    torch.save(resnet18().state_dict(), t / "r18.pth")
    return str(t / "r18.pth")


CASES: dict[str, tuple[Callable[[Path], dict], str]] = {
    "nonexistent path": (lambda t: _spec(t, {"source": "imagefolder", "path": str(t / "nope")}),
                         "does not exist"),
    "empty folder": (lambda t: (t / "e").mkdir() or _spec(t, {"source": "imagefolder",
                                                               "path": str(t / "e")}),
                     "no class subfolders"),
    "one class": (lambda t: _spec(t, {"source": "imagefolder",
                                      "path": str(_folder(t / "f", ("only",), 6))}),
                  "1 class(es)"),
    "no image files": (lambda t: ((t / "f" / "a").mkdir(parents=True),
                                  (t / "f" / "a" / "x.txt").write_text("x"),
                                  _spec(t, {"source": "imagefolder", "path": str(t / "f")}))[2],
                       "holds no images"),
    "labels not integers": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((4, 8, 8), np.uint8), labels=np.array(["a", "b", "a", "b"]))}),
        "not integers"),
    "NaN in arrays": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.full((4, 8, 8), np.nan, np.float32), labels=np.array([0, 1, 0, 1]))}),
        "NaN"),
    "image/label count mismatch": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0]))}), "4 images but 3"),
    "images of the wrong rank": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((4, 8), np.uint8), labels=np.array([0, 1, 0, 1]))}), "shape"),
    "negative labels": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, -1, 0, 1]))}),
        "negative label -1"),
    "manifest missing columns": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, "file,cls\nimgs/a/0.png,a\n")}), "columns ['file', 'cls']"),
    "manifest path outside root": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, "path,label\n../../etc/passwd,a\nimgs/a/0.png,b\n")}), "outside"),
    "manifest unknown split": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, "path,label,split\nimgs/a/0.png,a,holdout\n")}), "unknown split 'holdout'"),
    "manifest empty label": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, '{"path": "imgs/a/0.png"}\n', "m.jsonl")}), "lacks ['label']"),
    "hdf5 without labels": (lambda t: (h5py.File(t / "x.h5", "w").create_dataset(
        "images", data=np.zeros((3, 4, 4), np.uint8)).file.close(),
        _spec(t, {"source": "hdf5", "path": str(t / "x.h5")}))[1], "lacks array(s) ['labels']"),
    "hdf5 not hdf5": (lambda t: ((t / "x.h5").write_text("hello"),
                                 _spec(t, {"source": "hdf5", "path": str(t / "x.h5")}))[1],
                      "not a readable HDF5"),
    "unknown torchvision dataset": (lambda t: _spec(t, {"source": "torchvision",
                                                        "name": "ImageNet99", "path": str(t)}),
                                    "unknown torchvision dataset 'ImageNet99'"),
    "torchvision data not on disk": (lambda t: _spec(t, {"source": "torchvision",
                                                         "name": "CIFAR10", "path": str(t)}),
                                     "data.download: true"),
    "unknown source": (lambda t: _spec(t, {"source": "tarballs"}), "unknown source 'tarballs'"),
    "unknown backbone": (lambda t: _spec(t, {}, backbone={"name": "resnet5000"}),
                         "unknown backbone 'resnet5000'"),
    "unknown weights name": (lambda t: _spec(t, {}, backbone={"name": "resnet18",
                                                               "weights": "IMAGENET9K"}),
                             "unknown weights 'IMAGENET9K'"),
    "missing weights file": (lambda t: _spec(t, {}, backbone={"name": "resnet18",
                                                               "weights": str(t / "w.pth")}),
                             "does not exist"),
    "shard size 0": (lambda t: _spec(t, {"shard_size": 0}), "'data.shard_size': 0 must be > 0"),
    "test fraction 1": (lambda t: _spec(t, {"test_fraction": 1.0}), "not in (0, 1)"),
    "bool where a number goes": (lambda t: _spec(t, {"seed": True}), "is not an int"),
}


def test_wrong_architecture_weights_fail_in_the_worker_with_the_fix(tmp_path: Path) -> None:
    from pipeline.backbones import load_backbone

    with pytest.raises(FeaturefleetError, match=r"does not fit architecture 'resnet50'.*fix:"):
        load_backbone("resnet50", _r18(tmp_path))


def test_undecodable_files_are_recorded_skips(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f")
    (root / "a" / "zero.png").write_bytes(b"")
    good = root / "a" / "0.png"
    (root / "a" / "trunc.png").write_bytes(good.read_bytes()[:40])
    (root / "a" / "dir.png").mkdir()  # a folder where a file should be: unreadable as a file
    Image.new("RGB", (5000, 3), "red").save(root / "b" / "wide.png")  # large and thin is fine
    src = open_source(DataSpec(source="imagefolder", path=str(root)))
    loaded = src.load(range(len(src)))
    failed = {src.sample_id(i): why for i, why in loaded.failures}
    assert set(failed) == {"a/zero.png", "a/trunc.png"}
    assert all(why for why in failed.values())
    assert len(loaded.images) == len(src) - 2  # dir.png is not listed as an image file


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), "blue")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert decode_image(tmp_path / "r.jpg").shape == (40, 20, 3)


# --- the spec, field by field: generated from the models, so every new field is covered ----

def _spec_cases() -> dict[str, tuple[dict, str]]:
    """Every field of every section: a wrong type, and a value just past each bound, or an
    unknown choice. Each must fail at validation with the field's name and a fix."""
    import typing

    from pipeline.spec import BackboneSpec, DataSpec, FinetuneSpec, JobSpec, ProbeSpec

    cases: dict[str, tuple[dict, str]] = {}
    for section, model in (("data", DataSpec), ("backbone", BackboneSpec),
                           ("probe", ProbeSpec), ("finetune", FinetuneSpec), ("", JobSpec)):
        for name, info in model.model_fields.items():
            if name in ("data", "backbone", "probe", "finetune"):
                continue
            field = f"{section}.{name}" if section else name
            ann = str(info.annotation)
            def wrap(v: object, s: str = section, n: str = name) -> dict:
                return {s: {n: v}} if s else {n: v}

            bounds = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le")
                      if getattr(m, k, None) is not None}
            if "int" in ann or "float" in ann:
                cases[f"{field} is text"] = (wrap("many"), field)
                cases[f"{field} is a list"] = (wrap([1, 2]), field)
                for k, v in bounds.items():
                    past = {"gt": v, "ge": v - (1 if "int" in ann else 0.5),
                            "lt": v, "le": v * 10 + 1}[k]
                    cases[f"{field} {k} {v}"] = (wrap(past), field)
            if "Literal" in ann and "int" not in ann:
                cases[f"{field} unknown choice"] = (wrap("bogus-choice"), field)
            if ann == "<class 'bool'>":
                cases[f"{field} is a list"] = (wrap([True]), field)
            if typing.get_origin(info.annotation) is None and ann == "<class 'str'>":
                cases[f"{field} is a mapping"] = (wrap({"a": 1}), field)
    return cases


SPEC_CASES = _spec_cases()


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_every_spec_field_refuses_bad_values_with_a_fix(case: str) -> None:
    from pipeline.errors import SpecError

    raw, field = SPEC_CASES[case]
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(raw)
    msg = str(info.value)
    assert info.value.field == field, msg
    assert msg.startswith(f"spec field '{field}': ") and "fix: " in msg and "\n" not in msg


# --- more data cases ----------------------------------------------------------------------

def _write(t: Path, name: str, data: bytes) -> str:
    (t / name).write_bytes(data)
    return str(t / name)


MORE: dict[str, tuple[Callable[[Path], dict], str]] = {
    "manifest not UTF-8": (lambda t: _spec(t, {"source": "manifest", "path": _write(
        t, "m.csv", "path,label\nimgs/a/0.png,caf\xe9\n".encode("latin-1"))}), "not UTF-8"),
    "manifest more cells than header": (lambda t: _spec(t, {"source": "manifest",
                                                            "path": _manifest(
        t, "path,label\nimgs/a/0.png,a,extra,cells\n")}), "more cells than the header"),
    "manifest jsonl line not an object": (lambda t: _spec(t, {"source": "manifest",
                                                              "path": _manifest(
        t, '["imgs/a/0.png", "a"]\n', "m.jsonl")}), "not an object"),
    "manifest jsonl broken json": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, '{"path": "imgs/a/0.png", "label": \n', "m.jsonl")}), "not JSON"),
    "manifest path is absolute elsewhere": (lambda t: _spec(t, {"source": "manifest",
                                                                "path": _manifest(
        t, "path,label\n/etc/hostname,a\n")}), "outside"),
    "manifest empty": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(t, "")}),
                       "has no rows"),
    "manifest header only": (lambda t: _spec(t, {"source": "manifest",
                                                 "path": _manifest(t, "path,label\n")}),
                             "has no rows"),
    "manifest of one class": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, "path,label\n" + "".join(f"imgs/a/{i}.png,a\n" for i in range(3)))}),
        "1 class(es)"),
    "labels beyond int64": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((2, 4, 4), np.uint8),
        labels=np.array([0, 2**63 + 5], dtype=np.uint64))}), "class indices 0..K-1"),
    "labels with gaps": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1000]))}),
        "go up to 1000"),
    "labels of two dimensions": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros((2, 1), int))}),
        "labels have shape"),
    "images of five dimensions": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((2, 1, 4, 4, 3), np.uint8), labels=np.array([0, 1]))}), "shape"),
    "images with 5 channels": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((2, 4, 4, 5), np.uint8), labels=np.array([0, 1]))}),
        "neither HWC nor CHW"),
    "images of strings": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.array([["a"], ["b"]]), labels=np.array([0, 1]))}), "dtype"),
    "images of zero size": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((2, 0, 4), np.uint8), labels=np.array([0, 1]))}), "shape"),
    "fewer class names than classes": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, 2]),
        class_names=np.array(["a"]))}), "1 class names"),
    "npz holding a pickle": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.array([object()], dtype=object), labels=np.array([0]))}),
        "not a readable .npz"),
    "npz that is a text file": (lambda t: _spec(t, {"source": "npz", "path": _write(
        t, "x.npz", b"hello")}), "not a readable .npz"),
    "hdf5 labels of strings": (lambda t: (h5py.File(t / "s.h5", "w").create_dataset(
        "labels", data=np.array([b"a", b"b"])).file.close(), h5py.File(
        t / "s.h5", "a").create_dataset("images", data=np.zeros((2, 4, 4), np.uint8)).file.close(),
        _spec(t, {"source": "hdf5", "path": str(t / "s.h5")}))[2], "not integers"),
    "tar range too large": (lambda t: _spec(t, {"source": "webdataset",
                                                "path": str(t / "d-{0..9999999}.tar")}),
                            "names 10000000 files"),
    "tar that is not a tar": (lambda t: _spec(t, {"source": "webdataset", "path": _write(
        t, "x.tar", b"not a tar archive at all" * 40)}), "unreadable"),
    "tar without labels": (lambda t: (_tar_without_labels(t), _spec(
        t, {"source": "webdataset", "path": str(t / "x.tar")}))[1], "no image+label samples"),
    "folder with train but only val": (lambda t: (_folder(t / "f" / "val"), _spec(
        t, {"source": "imagefolder", "path": str(t / "f")}))[1], "no train/ folder"),
    "unseen test class": (lambda t: _spec(t, {"source": "manifest", "path": _distinct(
        t, ["a"] * 6 + ["b"] * 6 + ["a", "c"], ["train"] * 12 + ["test"] * 2)}),
        "have no training sample"),
    "conflicting labels refused": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, "path,label\nimgs/a/0.png,a\nimgs/a/0.png,b\nimgs/b/1.png,a\nimgs/b/2.png,b\n"),
        "conflicts": "error"}), "same content but the labels"),
    "store under a file": (lambda t: (_write(t, "blocker", b"x"), _spec(t, {"limit": 100}))[1]
                           | {"store": str(t / "blocker" / "store")}, "blocker"),
}


def _distinct(t: Path, labels: list[str], splits: list[str]) -> str:
    """A manifest of distinct random images with these labels and splits."""
    rng = np.random.default_rng(0)
    lines = ["path,label,split"]
    for i, (label, split) in enumerate(zip(labels, splits, strict=True)):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(t / f"{i}.png")
        lines.append(f"{i}.png,{label},{split}")
    (t / "m.csv").write_text("\n".join(lines))
    return str(t / "m.csv")


def _tar_without_labels(t: Path) -> None:
    import io
    import tarfile

    with tarfile.open(t / "x.tar", "w") as tf:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="PNG")
        info = tarfile.TarInfo("a.png")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("case", sorted(MORE))
def test_more_bad_data_is_a_clear_error(case: str, tmp_path: Path) -> None:
    build, words = MORE[case]
    raw = build(tmp_path)
    with pytest.raises(FeaturefleetError) as info:
        spec = JobSpec.from_dict(raw)
        plan = make_plan(spec, "00000000000c")
        if case == "store under a file":
            from pipeline.store.files import check_writable

            check_writable(plan.shard_dir)
    msg = str(info.value)
    assert words in msg, msg
    assert "fix:" in msg and "\n" not in msg and "Traceback" not in msg


def test_a_decompression_bomb_is_a_recorded_skip(tmp_path: Path) -> None:
    import io

    from pipeline.sources.decode import ImageTooLarge

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")  # baseline frame header: height and width follow
    raw[sof + 5: sof + 9] = (65500).to_bytes(2, "big") * 2
    assert len(raw) < 1000
    with pytest.raises(ImageTooLarge, match=r"decompression bomb"):
        decode_image(bytes(raw))
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, format="PNG")
    big = bytearray(png.getvalue())
    big[16:24] = (70000).to_bytes(4, "big") * 2  # IHDR width and height (checksum now off)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bomb.jpg").write_bytes(bytes(raw))
    (tmp_path / "a" / "bomb.png").write_bytes(bytes(big))
    _folder(tmp_path, ("b",))
    src = open_source(DataSpec(source="imagefolder", path=str(tmp_path)))
    loaded = src.load(range(len(src)))
    reasons = {src.sample_id(i): why for i, why in loaded.failures}
    assert "over the 150 MP limit" in reasons["a/bomb.jpg"]
    assert "a/bomb.png" in reasons  # refused before decoding, whichever check speaks first
    assert len(loaded.images) == 3


# --- round 3: the surfaces added since round 2 (issue 26) --------------------------------

def _texts(t: Path, rows: list[tuple[str, str]], name: str = "t.csv") -> str:
    import csv

    with open(t / name, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(t / name)


def _parquet(t: Path, table: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), t / "t.parquet")
    return str(t / "t.parquet")


def _latin1_label(t: Path) -> str:
    (t / "t.csv").write_bytes(b"text,label\n" + b"".join(
        b"some words %d,%s\n" % (i, b"caf\xe9" if i % 2 else b"tea") for i in range(8)))
    return str(t / "t.csv")


def _job_with_broken_report(t: Path) -> dict:
    d = t / "out" / "jobs" / "0123456789ab"
    d.mkdir(parents=True)
    (d / "plan.json").write_text("{}")
    (d / "report.json").write_text("{not json")
    return _spec(t, {}, backbone={"name": "job:0123456789ab"})


def _symlinked_text(t: Path) -> str:
    for c in ("a", "b"):
        (t / "txt" / c).mkdir(parents=True)
        for i in range(3):
            (t / "txt" / c / f"{i}.txt").write_text(f"{c} text {i}")
    (t / "txt" / "a" / "leak.txt").symlink_to("/etc/passwd")
    return str(t / "txt")


def _symlinked_image(t: Path) -> str:
    root = _folder(t / "f")
    _img(t / "outside.png")
    (root / "a" / "link.png").symlink_to(t / "outside.png")
    return str(root)


ROUND3: dict[str, tuple[Callable[[Path], dict], str]] = {
    "label not UTF-8": (lambda t: _spec(t, {"source": "text", "path": _latin1_label(t)},
                                        backbone={"name": "all-MiniLM-L6-v2"}), "not valid UTF-8"),
    "NUL byte in a manifest path": (lambda t: _spec(t, {"source": "manifest", "path": _manifest(
        t, "path,label\nimgs/a/0.png\0x,a\nimgs/b/1.png,b\n")}), "NUL byte"),
    "job backbone whose report is not JSON": (_job_with_broken_report, "not a readable report"),
    "int32 images above 255": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.full((4, 6, 6), 4000, np.int32), labels=np.array([0, 1, 0, 1]))}),
        "outside 0..255"),
    "float images above 255": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.full((4, 6, 6), 300.0, np.float32), labels=np.array([0, 1, 0, 1]))}),
        "outside 0..255"),
    "negative pixels": (lambda t: _spec(t, {"source": "npz", "path": _npz(
        t, images=np.full((4, 6, 6), -3, np.int16), labels=np.array([0, 1, 0, 1]))}),
        "outside 0..255"),
    "Parquet list<string> text column": (lambda t: _spec(t, {"source": "text", "path": _parquet(
        t, {"text": [["a", "b"], ["c"]] * 4, "label": ["x", "y"] * 4})},
        backbone={"name": "all-MiniLM-L6-v2"}), "not texts or labels"),
    "Parquet that decodes past the limit": (lambda t: _spec(t, {"source": "text",
                                                                "path": _parquet(
        t, {"text": ["a" * 1000] * 600_000, "label": ["x", "y"] * 300_000})},
        backbone={"name": "all-MiniLM-L6-v2"}), "decodes to"),
    "text folder with a link out": (lambda t: _spec(t, {"source": "text",
                                                        "path": _symlinked_text(t)},
                                                    backbone={"name": "all-MiniLM-L6-v2"}),
                                    "leads outside the data folder"),
    "image folder with a link out": (lambda t: _spec(t, {"source": "imagefolder",
                                                         "path": _symlinked_image(t)}),
                                     "leads outside the data folder"),
    "finetune batch larger than the training set": (lambda t: _spec(
        t, {"limit": 60}, strategy="finetune", finetune={"batch_size": 512}),
        "fewer than one batch (finetune.batch_size 512)"),
    "memory:// store": (lambda t: _spec(t, {}, store="memory://features"),
                        "lives in one process's memory"),
}


@pytest.mark.parametrize("case", sorted({**CASES, **ROUND3}))
def test_bad_input_is_a_clear_error(case: str, tmp_path: Path) -> None:
    build, words = {**CASES, **ROUND3}[case]
    raw = build(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(FeaturefleetError) as info:
        make_plan(JobSpec.from_dict(raw), "00000000000b")
    msg = str(info.value)
    assert words in msg, msg
    assert "fix:" in msg and "\n" not in msg and "Traceback" not in msg
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_spec_files_that_say_nothing_or_repeat_a_key_are_refused(tmp_path: Path) -> None:
    for name, text, words in [("empty.yaml", "", "is empty"),
                              ("comments.yaml", "# todo\n\n", "is empty"),
                              ("twice.yaml", "data:\n  limit: 10\n  limit: 20\n",
                               "'limit': given twice"),
                              ("twice.json", '{"name": "a", "name": "b"}', "'name': given twice")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(FeaturefleetError, match=words) as info:
            JobSpec.from_file(tmp_path / name)
        assert "fix:" in str(info.value)
    with pytest.raises(FeaturefleetError, match=r"did you mean 'shard_size'"):
        JobSpec.from_dict({"data": {"shard_sise": 64}})


def test_decoded_bombs_and_silent_corruption_are_recorded_skips(tmp_path: Path) -> None:
    """Bound what is decoded: a 3 GiB text member of a small gzip tar is skipped (never read
    whole), a JPEG whose data ends early is skipped, masks (bool) are black and white, a text
    column holding a list is never the repr of a list, __MACOSX is not a class."""
    import gzip
    import io
    import tarfile

    from pipeline.sources.decode import MAX_TEXT_BYTES
    from pipeline.sources.webdataset import TarSource

    path = tmp_path / "bomb.tar"
    with tarfile.open(path, "w") as tf:
        for i, (text, label) in enumerate([("hello there", "a"), ("general kenobi", "b")]):
            for ext, data in (("txt", text.encode()), ("cls", label.encode())):
                info = tarfile.TarInfo(f"{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("2.txt")
        info.size = 16 * MAX_TEXT_BYTES
        tf.addfile(info, io.BytesIO(bytes(info.size)))
        info = tarfile.TarInfo("2.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"a"))
    src = TarSource(str(path), modality="text")
    loaded = src.load(range(len(src)))
    assert sorted(loaded.images) == ["general kenobi", "hello there"]
    assert [why for _, why in loaded.failures] == [
        f"ValueError: tar member of {16 * MAX_TEXT_BYTES} bytes, over the {MAX_TEXT_BYTES}"
        "-byte limit of one sample (not read)"]
    # a gzip tar (3 MB can hold a 3 GiB member): refused before anything is decompressed
    with open(path, "rb") as fh, gzip.open(tmp_path / "bomb.tar.gz", "wb", 1) as gz:
        gz.write(fh.read())
    with pytest.raises(FeaturefleetError, match=r"gzip-compressed.*fix: store uncompressed"):
        TarSource(str(tmp_path / "bomb.tar.gz"), modality="text")
    # a JPEG cut short: skipped, not grey rows
    root = _folder(tmp_path / "f")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        buf, format="JPEG")
    (root / "a" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    (root / "a" / "whole.jpg").write_bytes(buf.getvalue())
    (root / "__MACOSX" / "a").mkdir(parents=True)
    _img(root / "__MACOSX" / "a" / "._0.png")
    src = open_source(DataSpec(source="imagefolder", path=str(root)))
    assert src.class_names == ["a", "b"]
    loaded = src.load(range(len(src)))
    failed = {src.sample_id(i): why for i, why in loaded.failures}
    assert list(failed) == ["a/cut.jpg"] and "truncated JPEG" in failed["a/cut.jpg"]
    from pipeline.sources.decode import to_rgb_uint8

    mask = to_rgb_uint8(np.array([[True, False]]))
    assert mask[0, 0].tolist() == [255, 255, 255] and mask[0, 1].tolist() == [0, 0, 0]
    from pipeline.sources.text import table_source

    (tmp_path / "t.jsonl").write_text("\n".join(
        ['{"text": ["a", "list"], "label": "x"}'] + [f'{{"text": "t{i}", "label": "{"xy"[i % 2]}"}}'
                                                    for i in range(4)]))
    table = table_source(tmp_path / "t.jsonl", DataSpec(source="text",
                                                        path=str(tmp_path / "t.jsonl")))
    assert "['a', 'list']" not in table.texts and table.dropped[0][0] == "line 1"


class _Evil:
    """Pickled into a "head": the safe loader must refuse it (never run it)."""


def test_predict_inputs_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from pipeline.client.cli import main
    from pipeline.predict import load_classifier

    with pytest.raises(SystemExit) as info:  # argparse: usage + one line, exit 2
        main(["predict", str(tmp_path), "--top", "0", "x.jpg"])
    assert info.value.code == 2 and "--top: 0 must be at least 1" in capsys.readouterr().err
    torch.save({"kind": "linear", "meta": "{}", "x": _Evil()}, tmp_path / "head.pt")
    with pytest.raises(FeaturefleetError, match=r"not a featurefleet head file that loads "
                                                r"safely \(UnpicklingError.*fix:"):
        load_classifier(tmp_path / "head.pt")
    assert main(["predict", str(tmp_path / "head.pt"), "a.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featurefleet: error:") and "Traceback" not in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00\x01binary\xff")))
    assert main(["predict", str(tmp_path / "head.pt"), "--text-file", "-"]) == 2
    assert "standard input is binary data" in capsys.readouterr().err


def test_features_that_are_not_finite_stop_training_with_the_fix(tmp_path: Path) -> None:
    from pipeline.store import shards
    from pipeline.train import read_splits

    x = np.ones((6, 4), np.float16)
    x[2, 1] = np.inf  # float16 overflow: what a fp16 backbone can produce
    path = tmp_path / shards.shard_name(0, 6)
    shards.write_shard(path, shards.ShardData(
        features=x, labels=np.array([0, 1] * 3), indices=np.arange(6),
        sample_ids=[f"s{i}" for i in range(6)], skipped=[], attrs={"key": "k"}))
    assert len(read_splits([str(path)], {"train": [0, 1]})["train"]) == 2
    with pytest.raises(FeaturefleetError, match=r"1 of 6 train feature rows are not finite "
                                                r"\(NaN or inf; e.g. sample index 2\).*fix:"):
        read_splits([str(path)], {"train": list(range(6))})


def test_features_float16_cannot_hold_are_refused_and_random_init_stores_float32(
        tmp_path: Path) -> None:
    """An untrained EfficientNet's features are ~1e-10: float16 shards would hold zeros.
    ``feature_dtype: auto`` stores a random-init network's features as float32; float16
    asked for explicitly is refused at extraction with the sample and the fix."""
    from pipeline.errors import BackboneError
    from pipeline.extract import refuse_underflow

    src = open_source(DataSpec(source="digits", limit=20))
    with pytest.raises(BackboneError, match=r"'3' are at most 2\.0e-10 .*feature_dtype: float32"):
        refuse_underflow(np.array([[1.0, 2.0], [1e-10, -2e-10]], np.float32), [0, 3], src)
    refuse_underflow(np.array([[0.0, 0.0], [1e-3, 0.0]], np.float32), [0, 1], src)  # fine
    base = JobSpec.from_dict({"data": {"source": "digits", "limit": 60},
                              "output": str(tmp_path)})
    assert make_plan(base, "a" * 12).backbone.feature_dtype == "float16"
    scratch = make_plan(base.replace(backbone={"weights": "random"}), "b" * 12)
    assert scratch.backbone.feature_dtype == "float32"
    forced = make_plan(base.replace(backbone={"weights": "random", "feature_dtype": "float16"}),
                       "c" * 12)
    assert forced.backbone.feature_dtype == "float16"


def test_random_weights_are_one_seeded_network_everywhere() -> None:
    """weights: random is the same network in every worker process and run (shards of one
    job, and cached shards of another, come from one network), and loading it leaves the
    caller's random stream alone."""
    from pipeline.backbones import load_backbone

    torch.manual_seed(1)
    a = load_backbone("resnet18", "random").model.state_dict()
    torch.manual_seed(2)
    before = torch.random.get_rng_state()
    b = load_backbone("resnet18", "random").model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
