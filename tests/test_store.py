from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.store import files, manifest, shards


def _data(n: int = 10, d: int = 8, key: str = "k1", seed: int = 0) -> shards.ShardData:
    rng = np.random.default_rng(seed)
    return shards.ShardData(
        features=rng.normal(size=(n, d)).astype(np.float16), labels=np.arange(n) % 3,
        indices=np.arange(100, 100 + n), sample_ids=[f"s{i}" for i in range(n)],
        skipped=[("bad.png", "UnidentifiedImageError: cannot identify")],
        attrs={"key": key, "backbone": "efficientnet_lite0", "preprocessing": {"crop": 32}})


def test_round_trip_and_writer_checksum(tmp_path: Path) -> None:
    path = tmp_path / "a" / shards.shard_name(0, 11)
    written = shards.write_shard(path, _data())
    assert written.sha256 == files.sha256_of(path) and not written.adopted
    got = shards.read_shard(path)
    assert got.features.dtype == np.float16 and got.features.shape == (10, 8)
    np.testing.assert_array_equal(got.features, _data().features)
    np.testing.assert_array_equal(got.indices, np.arange(100, 110))
    assert got.sample_ids[3] == "s3"
    assert got.skipped == [("bad.png", "UnidentifiedImageError: cannot identify")]
    assert got.attrs["preprocessing"] == {"crop": 32} and got.attrs["rows"] == 10
    info = shards.inspect(path, "k1", rows_expected=11)  # 10 rows + 1 skipped
    assert info is not None and info.rows == 10 and info.skipped[0]["id"] == "bad.png"
    assert shards.inspect(path, "k1", rows_expected=10) is None
    assert shards.inspect(path, "other-key") is None
    # no temp file left; the writer's checksum beside the shard
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{path.name}.json", path.name]
    assert shards.read_sidecar(path) == {"sha256": written.sha256, "rows": 10, "skipped": 1,
                                         "key": "k1"}


def test_truncated_or_inconsistent_shards_are_invalid(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    shards.write_shard(path, _data())
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    assert shards.inspect(path, "k1") is None
    with pytest.raises(StoreError, match="unreadable"):
        shards.read_shard(path)
    other = tmp_path / "t.h5"
    shards.write_shard(other, _data())
    with h5py.File(other, "r+") as f:  # rows attribute no longer matches the datasets
        f.attrs["rows"] = 7
    assert shards.inspect(other, "k1") is None


def test_a_reader_never_sees_a_partial_shard(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While the new file is being written, the path still holds the complete old shard (or
    nothing): checked at the moment the writer is half done. A writer that wrote in place
    would fail this check (shown with one)."""
    path = tmp_path / "s.h5"
    seen: list[Any] = []
    real = h5py.File

    class Spy(real):  # type: ignore[misc, valid-type]
        def create_dataset(self, name: str, *args: Any, **kw: Any) -> Any:
            out = super().create_dataset(name, *args, **kw)
            if name == "sample_ids":  # half written: features and labels are in, attrs not
                seen.append(shards.inspect(path, "k1"))
            return out

    def naive_write(target: Path, data: shards.ShardData) -> None:  # writes in place
        with Spy(target, "w") as f:
            f.create_dataset("features", data=data.features)
            f.create_dataset("sample_ids", data=np.asarray(data.sample_ids, dtype=object),
                             dtype=h5py.string_dtype())

    shards.write_shard(path, _data(seed=1))
    before = shards.read_shard(path).features
    monkeypatch.setattr(h5py, "File", Spy)
    shards.write_shard(path, _data(seed=2))
    assert len(seen) == 1 and seen[0] is not None and seen[0].rows == 10  # the old shard
    np.testing.assert_array_equal(shards.read_shard(path).features, _data(seed=2).features)
    assert not np.array_equal(before, _data(seed=2).features)
    seen.clear()
    naive_write(path, _data(seed=3))
    assert seen == [None]  # the in-place writer exposes a partial file: the check can fail


def test_concurrent_identical_writers_keep_one_file_and_true_checksums(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    planned = time.time() - 1
    first = shards.write_shard(path, _data(), not_before=planned)
    second = shards.write_shard(path, _data(), not_before=planned)  # a concurrent identical job
    assert second.adopted and second.sha256 == first.sha256 == files.sha256_of(path)
    # older than the plan but still the bytes its writer recorded (a job whose collect had
    # not yet put it in the manifest when this one planned): adopted, never rewritten
    # under a job that has planned it as cached since
    old = time.time() - 3600
    os.utime(path, (old, old))
    third = shards.write_shard(path, _data(seed=5), not_before=planned)
    assert third.adopted and third.sha256 == first.sha256 == files.sha256_of(path)
    # older and not what its writer recorded (changed on disk: judged untrusted at
    # planning), or with no writer's record at all: replaced
    side = Path(shards.sidecar(path))
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": "0" * 64}))
    os.utime(path, (old, old))
    fourth = shards.write_shard(path, _data(seed=6), not_before=planned)
    assert not fourth.adopted and fourth.sha256 == files.sha256_of(path) != first.sha256
    side.unlink()
    os.utime(path, (old, old))
    fifth = shards.write_shard(path, _data(seed=7), not_before=planned)
    assert not fifth.adopted and fifth.sha256 == files.sha256_of(path) != fourth.sha256


def test_store_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=r"cannot create store folder.*fix:"):
        shards.write_shard(blocker / "s.h5", _data())


def test_reader_selects_rows_by_sample_id_in_bounded_chunks(tmp_path: Path) -> None:
    paths = []
    for i, n in enumerate((5, 7)):
        p = tmp_path / f"{i}.h5"
        data = _data(n, seed=i)
        data.indices = np.arange(10 * i, 10 * i + n)
        shards.write_shard(p, data)
        paths.append(str(p))
    reader = shards.ShardReader(paths)
    assert reader.rows == 12 and reader.dim == 8
    chunks = list(reader.chunks(max_rows=3))
    assert [len(c[1]) for c in chunks] == [3, 2, 3, 3, 1]
    x, y, idx = reader.read()
    np.testing.assert_array_equal(x, np.concatenate([c[0] for c in chunks]))
    assert x.dtype == np.float32 and len(y) == len(idx) == 12
    wanted = shards.ShardReader(paths, np.array([14, 2, 11, 99]))
    xw, _yw, iw = wanted.read()
    assert iw.tolist() == [2, 11, 14] and wanted.rows == 3
    np.testing.assert_array_equal(xw, x[np.isin(idx, [2, 11, 14])])
    assert wanted.sample_ids() == ["s2", "s1", "s4"]


def test_manifest_records_only_what_writers_reported(tmp_path: Path) -> None:
    path = tmp_path / shards.shard_name(0, 11)
    written = shards.write_shard(path, _data())
    manifest.record(tmp_path, {path.name: {"sha256": written.sha256, "rows": 10,
                                           "skipped": 1}}, {"key": "k1"})
    known = manifest.read_manifest(tmp_path)
    assert manifest.trusted(path, "k1", 11, known)
    with h5py.File(path, "r+") as f:  # damaged after it was written: no longer trusted
        f["features"][0, 0] = 99
    assert not manifest.trusted(path, "k1", 11, manifest.read_manifest(tmp_path))
    assert manifest.read_manifest(tmp_path)["shards"][path.name]["sha256"] == written.sha256


def test_a_full_disk_fails_cleanly_and_leaves_no_debris(tmp_path: Path) -> None:
    """A real full disk (a 256 KiB tmpfs, where root may mount one): the write fails with the
    fix, nothing half-written is visible, no temp file stays; once space is back, the retry
    writes the shard and sweeps the debris a killed writer left beside it."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = mnt / "key" / shards.shard_name(0, 20000)
        with pytest.raises(StoreError, match=r"cannot write shard .*free space"):
            shards.write_shard(path, _data(n=20000, d=64))
        assert not path.exists() and not list(path.parent.glob(".*.tmp"))
        # debris of a writer killed mid-write (its process is gone) and a live writer's file
        dead = path.with_name(f".{path.name}.{files._WRITER}-999999999.0123abcd.tmp")
        live = path.with_name(f".{path.name}.{files._WRITER}-{os.getpid()}.4567abcd.tmp")
        dead.write_bytes(b"x")
        live.write_bytes(b"y")
        shards.write_shard(path, _data(n=100, d=8))
        assert shards.inspect(path, "k1") is not None
        assert not dead.exists() and live.exists()  # a live writer's file is never touched
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
