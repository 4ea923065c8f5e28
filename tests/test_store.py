from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import store
from pipeline.errors import StoreError


def _data(n: int = 10, d: int = 8, key: str = "k1") -> store.ShardData:
    rng = np.random.default_rng(0)
    return store.ShardData(
        features=rng.normal(size=(n, d)).astype(np.float16), labels=np.arange(n) % 3,
        indices=np.arange(100, 100 + n), sample_ids=[f"s{i}" for i in range(n)],
        skipped=[("bad.png", "UnidentifiedImageError: cannot identify")],
        attrs={"key": key, "backbone": "efficientnet_lite0", "preprocessing": {"crop": 32}})


def test_round_trip_and_checksum(tmp_path: Path) -> None:
    path = tmp_path / "a" / store.shard_name("train", 0, 11)
    sha = store.write_shard(path, _data())
    assert sha == store.file_sha256(path)
    got = store.read_shard(path)
    assert got.features.dtype == np.float16 and got.features.shape == (10, 8)
    np.testing.assert_array_equal(got.features, _data().features)
    np.testing.assert_array_equal(got.indices, np.arange(100, 110))
    assert got.sample_ids[3] == "s3"
    assert got.skipped == [("bad.png", "UnidentifiedImageError: cannot identify")]
    assert got.attrs["preprocessing"] == {"crop": 32} and got.attrs["rows"] == 10
    assert store.valid_shard(path, "k1", rows_expected=11)  # 10 rows + 1 skipped
    assert not store.valid_shard(path, "k1", rows_expected=10)
    assert not store.valid_shard(path, "other-key")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_truncated_shard_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    store.write_shard(path, _data())
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    assert not store.valid_shard(path, "k1")
    with pytest.raises(StoreError, match="unreadable"):
        store.read_shard(path)


def test_rewrite_is_atomic_and_identical(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    store.write_shard(path, _data())
    before = store.read_shard(path).features
    store.write_shard(path, _data())  # a redelivered task writes the same shard again
    np.testing.assert_array_equal(store.read_shard(path).features, before)


def test_store_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=r"cannot create store folder.*fix:"):
        store.write_shard(blocker / "s.h5", _data())


def test_load_split_concatenates_in_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    store.write_shard(a, _data(4))
    store.write_shard(b, _data(6))
    x, y, skipped = store.load_split([str(a), str(b)])
    assert x.shape == (10, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(y, np.concatenate([np.arange(4) % 3, np.arange(6) % 3]))
    assert len(skipped) == 2


def test_reader_streams_in_bounded_chunks(tmp_path: Path) -> None:
    paths = []
    for i, n in enumerate((5, 7)):
        p = tmp_path / f"{i}.h5"
        store.write_shard(p, _data(n))
        paths.append(str(p))
    reader = store.ShardReader(paths)
    assert reader.rows == 12 and reader.dim == 8
    chunks = list(reader.chunks(max_rows=3))
    assert [len(c[1]) for c in chunks] == [3, 2, 3, 3, 1]
    x, y, idx = reader.read_all()
    np.testing.assert_array_equal(x, np.concatenate([c[0] for c in chunks]))
    assert x.dtype == np.float32 and len(y) == len(idx) == 12
