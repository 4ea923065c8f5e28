"""Data sources end to end, and the feature store as a verified cache."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline import submit
from pipeline.errors import DataError
from pipeline.sources import digests, open_source
from pipeline.spec import DataSpec, JobSpec
from pipeline.splits import compute_splits
from workers.launcher import LocalCluster

CLI = [sys.executable, "-m", "pipeline"]


def split_indices(src, spec: DataSpec) -> dict:  # type: ignore[no-untyped-def]
    return compute_splits(src.labels, src.predefined_splits(), seed=spec.seed,
                          test_fraction=spec.test_fraction, val_fraction=0.2, limit=spec.limit)


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.round(d.images[:n] * 255 / 16).astype(np.uint8), d.target[:n]


def _mnist_root(root: Path, n_train: int = 60, n_test: int = 30) -> Path:
    """A root folder in torchvision's MNIST on-disk layout (idx files), made from digits."""
    images, labels = _digits(n_train + n_test)
    images = np.stack([np.kron(im, np.ones((3, 3), np.uint8))[:28, :28] for im in images])
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, :28, :28]
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, sl in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        im, lab = images[sl], labels[sl].astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, len(im), 28, 28) + im.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, len(lab)) + lab.tobytes())
    return root


def test_torchvision_dataset_from_a_prepared_root(tmp_path: Path) -> None:
    spec = DataSpec(source="torchvision", name="MNIST", path=str(_mnist_root(tmp_path)))
    src = open_source(spec)
    splits = split_indices(src, spec)
    assert len(splits["train"]) + len(splits["val"]) == 60 and len(splits["test"]) == 30
    assert src.class_names[0].startswith("0")
    im = src.load([0]).images[0]
    assert im.shape == (28, 28, 3) and im.dtype == np.uint8 and im.max() > 200


def test_manifest_and_hdf5_sources(tmp_path: Path) -> None:
    images, labels = _digits(40)
    lines = ["path,label,split"]
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{lab},{'test' if i % 4 == 0 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(lines))
    spec = DataSpec(source="manifest", path=str(tmp_path / "m.csv"))
    src = open_source(spec)
    splits = split_indices(src, spec)
    assert len(splits["test"]) == 10 and src.class_names == [str(i) for i in range(10)]
    assert src.load([3]).images[0].shape == (8, 8, 3)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"], f["labels"] = images, labels
    hsrc = open_source(DataSpec(source="hdf5", path=str(tmp_path / "d.h5")))
    assert len(hsrc) == 40 and hsrc.load([1]).images[0].shape == (8, 8, 3)


@pytest.mark.integration
def test_torchvision_job_and_cache_lifecycle(cluster: LocalCluster, tmp_path: Path) -> None:
    root = _mnist_root(tmp_path / "mnist")
    spec = JobSpec.from_dict({
        "data": {"source": "torchvision", "name": "MNIST", "path": str(root), "shard_size": 32},
        "backbone": {"image_size": 32}, "output": str(tmp_path / "out")})
    first = submit(spec, broker=cluster.broker)
    assert first.wait(timeout=300)["status"] == "SUCCESS"
    rep = first.result()
    store_dir = Path(rep["feature_store"]["dir"])
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert {Path(s["path"]).name: s["sha256"] for s in rep["shards"]} == \
        {k: v["sha256"] for k, v in manifest["shards"].items()}
    # Damage one shard on disk: the cache must not trust it, and re-extracts only that one.
    victim = Path(rep["shards"][0]["path"])
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    store = str(tmp_path / "out" / "store")
    bad = subprocess.run([*CLI, "cache", "verify", "--store", store], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and victim.name in bad.stdout
    second = submit(spec, broker=cluster.broker)
    st = second.wait(timeout=300)
    assert st["status"] == "SUCCESS" and st["shards_cached"] == len(rep["shards"]) - 1
    assert second.result()["metrics"]["top1"] == rep["metrics"]["top1"]
    good = subprocess.run([*CLI, "cache", "verify", "--store", store], capture_output=True,
                          text=True, timeout=120)
    assert good.returncode == 0 and "all shards verified" in good.stdout
    ls = subprocess.run([*CLI, "cache", "ls", "--store", store, "--json"], capture_output=True,
                        text=True, timeout=120)
    sets = json.loads(ls.stdout)
    assert len(sets) == 1 and sets[0]["rows"] == 90 and sets[0]["source"] == "torchvision"
    rm = subprocess.run([*CLI, "cache", "rm", sets[0]["set"], "--store", store],
                        capture_output=True, text=True, timeout=120)
    assert rm.returncode == 0 and not store_dir.exists()
    assert (tmp_path / "out" / "jobs" / first.id / "report.json").is_file()  # results kept


@pytest.mark.integration
def test_too_many_unreadable_samples_fail_the_job(cluster: LocalCluster, tmp_path: Path) -> None:
    images, labels = _digits(30)
    for i, (im, lab) in enumerate(zip(images, labels % 2, strict=True)):
        path = tmp_path / "f" / str(lab) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 5 == 0:
            path.write_bytes(b"\x89PNG broken %d" % i)  # 6 of 30 are corrupt: 20%
        else:
            Image.fromarray(im).save(path)
    spec = JobSpec.from_dict({"data": {"source": "imagefolder", "path": str(tmp_path / "f"),
                                       "shard_size": 10, "max_skipped_fraction": 0.1},
                              "backbone": {"image_size": 32}, "output": str(tmp_path / "out")})
    st = submit(spec, broker=cluster.broker).wait(timeout=300)
    assert st["status"] == "FAILED"
    assert "6 of 30 samples could not be read" in st["error"] and "0/0.png" in st["error"]
    assert not list((tmp_path / "out").rglob("*.tmp"))
    # Within the bound the same data trains, and the report lists every skip.
    ok = submit(JobSpec.from_dict({**spec.to_dict(), "data": {
        **spec.to_dict()["data"], "max_skipped_fraction": 0.3}}), broker=cluster.broker)
    assert ok.wait(timeout=300)["status"] == "SUCCESS"
    assert len(ok.result()["data"]["skipped"]) == 6
    assert os.path.isfile(ok.status()["report"])


def _tar(path: Path, start: int, n: int) -> None:
    import io
    import tarfile

    images, labels = _digits(start + n)
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            for name, payload in ((f"s{i:05d}.png", buf.getvalue()),
                                  (f"s{i:05d}.cls", str(labels[i]).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def test_webdataset_tar_shards(tmp_path: Path) -> None:
    for k in range(3):
        _tar(tmp_path / f"train-{k:03d}.tar", 20 * k, 20)
    _tar(tmp_path / "test-000.tar", 60, 20)
    images, labels = _digits(80)
    spec = DataSpec(source="webdataset", path=str(tmp_path / "train-{000..002}.tar"))
    src = open_source(spec)
    assert len(src) == 60 and src.class_names == [str(i) for i in range(10)]
    got = src.load([45, 3, 21])
    assert got.indices == [45, 3, 21]
    np.testing.assert_array_equal(got.images[0][..., 0], images[45])
    assert [src.class_names[src.labels[i]] for i in (45, 3)] == [str(labels[45]), str(labels[3])]
    both = open_source(DataSpec(source="webdataset", path=str(tmp_path)))
    splits = split_indices(both, DataSpec(source="webdataset", path=str(tmp_path)))
    assert len(splits["train"]) + len(splits["val"]) == 60 and len(splits["test"]) == 20
    with pytest.raises(DataError, match="does not exist"):
        open_source(DataSpec(source="webdataset", path=str(tmp_path / "train-{000..009}.tar")))
    url = open_source(DataSpec(source="webdataset",
                                    path=f"file://{tmp_path}/train-{{000..002}}.tar"))
    assert len(url) == 60  # through fsspec: the same samples, byte for byte
    np.testing.assert_array_equal(digests(url, range(60)), digests(src, range(60)))
