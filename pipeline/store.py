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

The store root may also be an fsspec URL (``s3://bucket/prefix``, ``gs://…``): a shard is
written to a local temporary file, then uploaded as one object (an object store makes an upload
visible only once complete: the same all-or-nothing as the rename); readers stream the object
with range reads through h5py's file-object driver, without downloading it first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
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


def is_remote(path: str | Path) -> bool:
    """An fsspec URL (``s3://…``), not a local path."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(root: str | Path, *parts: str) -> str:
    """``root/part/…`` for local paths and URLs alike (Path would fold ``s3://`` to ``s3:/``)."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(root).joinpath(*parts))


def _fs(url: str) -> Any:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)[0]
    except ImportError as exc:
        raise StoreError(f"store {url!r} needs an fsspec driver ({exc}); fix: pip install "
                         "'featurefleet[s3]' (s3fs)") from None


@contextlib.contextmanager
def _h5(path: str | Path) -> Iterator[Any]:
    """An HDF5 file open for reading: local, or streamed from an object store."""
    import h5py

    if not is_remote(path):
        with h5py.File(path, "r") as f:
            yield f
        return
    with _fs(str(path)).open(str(path), "rb", block_size=8 << 20) as fh, \
            h5py.File(fh, "r") as f:
        yield f


def exists(path: str | Path) -> bool:
    if is_remote(path):
        try:
            return bool(_fs(str(path)).isfile(str(path)))
        except OSError:
            return False
    return Path(path).is_file()


def mtime(path: str | Path) -> float:
    """When the file was last written (seconds since the epoch)."""
    if not is_remote(path):
        return os.path.getmtime(path)
    info = _fs(str(path)).info(str(path))
    when = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` (or check the bucket) and write + delete a probe object there.

    Raises:
        StoreError: not writable, naming the folder and the fix.
    """
    probe = join(folder, f".write-test-{uuid.uuid4().hex[:6]}")
    try:
        if is_remote(folder):
            fs = _fs(probe)
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        else:
            Path(folder).mkdir(parents=True, exist_ok=True)
            Path(probe).write_text("")
            Path(probe).unlink()
    except (OSError, PermissionError) as exc:
        raise StoreError(f"folder {str(folder)!r} is not writable "
                         f"({getattr(exc, 'strerror', None) or exc}); fix: choose another "
                         "output/store location or fix its permissions/credentials") from None


def write_shard(path: str | Path, data: ShardData) -> str:
    """Write a shard atomically; return its sha256.

    Raises:
        StoreError: the folder cannot be created or written.
    """
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="ff-shard-") as local:
            staged = Path(local) / Path(str(path)).name
            sha = write_shard(staged, data)
            try:  # one object PUT (multipart completes atomically): never half a shard
                _fs(str(path)).put_file(str(staged), str(path))
            except OSError as exc:
                raise StoreError(f"cannot upload shard {str(path)!r} ({exc}); fix: check the "
                                 "bucket exists and the credentials can write to it") from None
        return sha
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
    try:
        with _h5(path) as f:
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
    if not exists(path):
        return None
    try:
        with _h5(path) as f:
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
    path = join(shard_dir, MANIFEST)
    try:
        if is_remote(path):
            raw = json.loads(_remote_text(path))
        else:
            raw = json.loads(Path(path).read_text())
        return raw if isinstance(raw, dict) and isinstance(raw.get("shards"), dict) else \
            {"shards": {}}
    except (OSError, ValueError):
        return {"shards": {}}


def _remote_text(url: str) -> str:
    """An object's text ("{}" when absent); an unreachable store is a clear error."""
    try:
        return _fs(url).cat_file(url).decode()
    except FileNotFoundError:
        return "{}"
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors
        raise StoreError(f"cannot reach the store at {url!r} ({type(exc).__name__}: {exc}); "
                         "fix: check the URL, the credentials (AWS_ACCESS_KEY_ID, ...) and the "
                         "endpoint (AWS_ENDPOINT_URL)") from None


def update_manifest(shard_dir: str | Path, entries: dict[str, dict[str, Any]],
                    info: dict[str, Any]) -> None:
    """Merge shard checksums into the set's manifest (atomic replace)."""
    current = read_manifest(shard_dir)
    current["shards"].update(entries)
    current.update(info, updated=time.time())
    text = json.dumps(current, indent=1, sort_keys=True)
    if is_remote(shard_dir):  # one object PUT replaces it whole
        url = join(shard_dir, MANIFEST)
        _fs(url).pipe_file(url, text.encode())
        return
    path = Path(shard_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def trusted_shard(path: str | Path, key: str, rows: int, manifest: dict[str, Any]) -> bool:
    """A shard the cache may reuse: complete, of this key, and matching the checksum the
    manifest recorded when its job checked it (a truncated, foreign or edited file fails)."""
    entry = manifest["shards"].get(Path(path).name)
    return bool(entry) and valid_shard(path, key, rows) and file_sha256(path) == entry["sha256"]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    opener = _fs(str(path)).open if is_remote(path) else open
    with opener(str(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_summary(path: str | Path) -> dict[str, Any]:
    """Rows, sha256 and skipped samples of a finished shard (for results and reports)."""
    try:
        with _h5(path) as f:  # attributes and the skip list only, not the features
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
        self.paths = list(paths)
        self.sizes: list[int] = []
        self.dim = 0
        for p in self.paths:
            try:
                with _h5(p) as f:
                    self.sizes.append(int(f["features"].shape[0]))
                    self.dim = int(f["features"].shape[1]) if f["features"].ndim == 2 else 0
            except (OSError, KeyError) as exc:
                raise StoreError(f"shard {p!r} is unreadable ({exc}); fix: delete it and rerun "
                                 "the job, or run featurefleet cache verify") from None

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def chunks(self, max_rows: int = 65536) -> Any:
        for p, n in zip(self.paths, self.sizes, strict=True):
            with _h5(p) as f:
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
