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


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error(case: str, tmp_path: Path) -> None:
    build, words = CASES[case]
    raw = build(tmp_path)
    with pytest.raises(FeaturefleetError) as info:
        make_plan(JobSpec.from_dict(raw), "00000000000b")
    msg = str(info.value)
    assert words in msg, msg
    assert "fix:" in msg and "\n" not in msg and "Traceback" not in msg
    assert not (tmp_path / "out").exists()  # nothing written


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
