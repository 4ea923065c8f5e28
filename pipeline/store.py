"""The HDF5 shard store: one file per shard, written atomically, verified before reuse.

Layout: ``<store>/<content key>/<split>-<start>-<end>.h5``. The content key hashes everything
that determines the features (data fingerprint, split, shard size, backbone, weights sha256,
preprocessing, dtype, schema version), so a finished shard *is* the cache entry: a rerun with
the same key skips it.

Each file holds ``features`` (N x D), ``labels`` (N), ``indices`` (N, positions in the data
source), ``sample_ids`` (N) and ``skipped`` (sample id + reason for undecodable samples), with
attributes naming how it was made. A file is written under a temporary name and renamed into
place only when complete, so a reader never sees half a shard and two writers of the same shard
(a redelivered task) never corrupt it: the last rename wins with identical content.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StoreError

SCHEMA_VERSION = 1


@dataclass
class ShardData:
    """What one shard holds, in memory."""

    features: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    sample_ids: list[str]
    skipped: list[tuple[str, str]]
    attrs: dict[str, Any]


def shard_name(split: str, start: int, end: int) -> str:
    return f"{split}-{start:08d}-{end:08d}.h5"


def write_shard(path: str | Path, data: ShardData) -> str:
    """Write a shard atomically; return its sha256.

    Raises:
        StoreError: the folder cannot be created or written.
    """
    import h5py

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create store folder {str(path.parent)!r} ({exc.strerror}); "
                         "fix: set store to a writable folder") from None
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            n, d = data.features.shape if data.features.ndim == 2 else (0, 0)
            # One chunk per shard-sized block of rows: written whole, read whole.
            f.create_dataset("features", data=data.features,
                             chunks=(max(1, min(n, 1024)), max(1, d)) if n else None)
            f.create_dataset("labels", data=data.labels.astype(np.int64))
            f.create_dataset("indices", data=data.indices.astype(np.int64))
            f.create_dataset("sample_ids", data=np.asarray(data.sample_ids, dtype=object),
                             dtype=h5py.string_dtype())
            skipped = np.asarray([f"{sid}\t{why}" for sid, why in data.skipped], dtype=object)
            f.create_dataset("skipped", data=skipped, dtype=h5py.string_dtype(),
                             shape=(len(skipped),))
            for key, value in data.attrs.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["rows"] = n
            f.attrs["created"] = time.time()
            f.attrs["complete"] = True
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write shard {str(path)!r} ({exc.strerror or exc}); fix: "
                         "check the store folder is writable and has free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(path)


def read_shard(path: str | Path) -> ShardData:
    """Read a whole shard.

    Raises:
        StoreError: the file is missing, truncated or not a complete featurefleet shard.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise StoreError(f"shard {str(path)!r} is incomplete; fix: rerun the job to "
                                 "extract it again")
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            skipped = [tuple(s.split("\t", 1)) for s in f["skipped"].asstr()[:]]
            return ShardData(
                features=f["features"][:], labels=f["labels"][:], indices=f["indices"][:],
                sample_ids=list(f["sample_ids"].asstr()[:]),
                skipped=[(a, b) for a, b in skipped], attrs=attrs)
    except (OSError, KeyError) as exc:
        raise StoreError(f"shard {str(path)!r} is unreadable ({exc}); fix: delete it and rerun "
                         "the job, or run featurefleet cache verify") from None


def valid_shard(path: str | Path, key: str, rows_expected: int | None = None) -> bool:
    """True when ``path`` is a complete shard of content key ``key`` (cheap: attributes only)."""
    return _inspect(path, key, rows_expected) is not None


def cached_summary(path: str | Path, key: str, rows_expected: int) -> dict[str, Any] | None:
    """:func:`shard_summary` of a valid shard of ``key`` (one open), else None."""
    info = _inspect(path, key, rows_expected)
    if info is None:
        return None
    return {**info, "sha256": file_sha256(path)}


def _inspect(path: str | Path, key: str, rows_expected: int | None) -> dict[str, Any] | None:
    import h5py

    p = Path(path)
    if not p.is_file():
        return None
    try:
        with h5py.File(p, "r") as f:
            ok = bool(f.attrs.get("complete", False)) and f.attrs.get("key") == key \
                and int(f.attrs.get("schema_version", -1)) == SCHEMA_VERSION
            rows = int(f.attrs.get("rows", -1))
            skipped = [s.split("\t", 1) for s in f["skipped"].asstr()[:]]
            if not ok or f["features"].shape[0] != rows:
                return None
            if rows_expected is not None and rows + len(skipped) != rows_expected:
                return None
            return {"rows": rows, "skipped": [{"id": a, "reason": b} for a, b in skipped]}
    except (OSError, KeyError, ValueError):
        return None


MANIFEST = "manifest.json"


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """``{"shards": {file name: {"sha256", "rows", "skipped"}}, ...}`` of a shard set."""
    path = Path(shard_dir) / MANIFEST
    try:
        raw = json.loads(path.read_text())
        return raw if isinstance(raw, dict) and isinstance(raw.get("shards"), dict) else \
            {"shards": {}}
    except (OSError, ValueError):
        return {"shards": {}}


def update_manifest(shard_dir: str | Path, entries: dict[str, dict[str, Any]],
                    info: dict[str, Any]) -> None:
    """Merge shard checksums into the set's manifest (atomic replace)."""
    path = Path(shard_dir) / MANIFEST
    current = read_manifest(shard_dir)
    current["shards"].update(entries)
    current.update(info, updated=time.time())
    tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
    os.replace(tmp, path)


def trusted_shard(path: str | Path, key: str, rows: int, manifest: dict[str, Any]) -> bool:
    """A shard the cache may reuse: complete, of this key, and matching the checksum the
    manifest recorded when its job checked it (a truncated, foreign or edited file fails)."""
    entry = manifest["shards"].get(Path(path).name)
    return bool(entry) and valid_shard(path, key, rows) and file_sha256(path) == entry["sha256"]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_summary(path: str | Path) -> dict[str, Any]:
    """Rows, sha256 and skipped samples of a finished shard (for results and reports)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:  # attributes and the skip list only, not the features
            rows = int(f.attrs["rows"])
            skipped = [s.split("\t", 1) for s in f["skipped"].asstr()[:]]
    except (OSError, KeyError) as exc:
        raise StoreError(f"shard {str(path)!r} is unreadable ({exc}); fix: delete it and rerun "
                         "the job") from None
    return {"rows": rows, "sha256": file_sha256(path),
            "skipped": [{"id": a, "reason": b} for a, b in skipped]}


class ShardReader:
    """All shards of a split read as one, in order, with bounded memory.

    ``chunks`` streams (features as float32, labels, indices) at most ``max_rows`` rows at a
    time; ``read_all`` fills one preallocated array, so loading a split costs its final size
    plus one chunk, not a copy per shard plus a concatenation.
    """

    def __init__(self, paths: list[str]) -> None:
        import h5py

        self.paths = list(paths)
        self.sizes: list[int] = []
        self.dim = 0
        for p in self.paths:
            try:
                with h5py.File(p, "r") as f:
                    self.sizes.append(int(f["features"].shape[0]))
                    self.dim = int(f["features"].shape[1]) if f["features"].ndim == 2 else 0
            except (OSError, KeyError) as exc:
                raise StoreError(f"shard {p!r} is unreadable ({exc}); fix: delete it and rerun "
                                 "the job, or run featurefleet cache verify") from None

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def chunks(self, max_rows: int = 65536) -> Any:
        import h5py

        for p, n in zip(self.paths, self.sizes, strict=True):
            with h5py.File(p, "r") as f:
                for s in range(0, n, max_rows):
                    e = min(n, s + max_rows)
                    yield (f["features"][s:e].astype(np.float32), f["labels"][s:e],
                           f["indices"][s:e])

    def read_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.empty((self.rows, self.dim), np.float32)
        y = np.empty(self.rows, np.int64)
        idx = np.empty(self.rows, np.int64)
        at = 0
        for fx, fy, fi in self.chunks():
            x[at: at + len(fy)], y[at: at + len(fy)], idx[at: at + len(fy)] = fx, fy, fi
            at += len(fy)
        return x, y, idx


def load_split(paths: list[str]) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Features (float32), labels and skips of several shards, in the given order."""
    x, y, _idx = ShardReader(paths).read_all()
    skipped = [(s["id"], s["reason"]) for p in paths for s in shard_summary(p)["skipped"]]
    return x, y, skipped


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
