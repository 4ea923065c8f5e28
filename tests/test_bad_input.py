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
