"""HDF5 feature shards: one file per shard, written atomically, checked by one function.

Layout: ``<store>/<backbone>/<content key>/<start>-<end>.h5`` (positions in the job's list of
extracted samples). The content key hashes everything that determines the features (data
fingerprint, the samples extracted, shard size, backbone, weights sha256, preprocessing, dtype,
precision, schema version), so a finished shard *is* the cache entry: a rerun with the same
key skips it. Splits are not part of a shard: the plan says which samples are train, val and
test, so changing the split reuses the features.

Each file holds ``features`` (N x D), ``labels`` (N), ``indices`` (N, positions in the data
source), ``sample_ids`` (N) and ``skipped`` (sample id + reason of undecodable samples), with
attributes naming how it was made. The writer computes the file's sha256 before publishing it
(the only checksum the cache manifest records) and never replaces a valid shard that another
writer of the same content published first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import StoreError
from pipeline.store import files

SCHEMA_VERSION = 4  # 3: + signatures; 4: + details (images)


@dataclass
class ShardData:
    """What one shard holds, in memory."""

    features: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    sample_ids: list[str]
    skipped: list[tuple[str, str]]
    attrs: dict[str, Any]
    # per row: a 16x16 grey thumbnail of the model's input, centred and unit-length (float16):
    # near duplicates that a backbone's features miss (noise, re-encoding) are found with it
    signatures: np.ndarray | None = None
    # images: a 64 x 64 grey picture per row (uint8; ``quality.detail`` compares their fine
    # detail, where distinct crops of one smooth photo differ and their thumbnails do not)
    details: np.ndarray | None = None


class ShardResult(BaseModel):
    """What one extraction task reports about its shard (kept in the job record, listed in
    the report): the file, its writer's checksum, what was skipped, and how it ran."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    path: str
    rows: int
    shard: str = ""  # the plan's shard id ("<start>-<end>")
    sha256: str | None = None
    cached: bool = False  # a valid file was already there: nothing was extracted
    adopted: bool = False  # a concurrent identical task's file was kept
    skipped: list[dict[str, str]] = Field(default_factory=list)  # {"id", "reason"}
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float | None = None
    model_seconds: float | None = None
    images_per_s: float | None = None
    device: str | None = None
    threads: int | None = None
    batch: int | None = None
    forward_batch: int | None = None
    decode: str | None = None
    decoder: str | None = None
    modality: str | None = None
    truncated: int | None = None
    precision: str | None = None
    compiled: bool | None = None
    feature_dim: int | None = None
    parameters: int | None = None


@dataclass(frozen=True)
class ShardInfo:
    """A valid shard's row count and skipped samples (from :func:`inspect`)."""

    rows: int
    skipped: list[dict[str, str]]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Written:
    """Where a shard write ended: the sha256 of the file now at the path, and whether that
    file came from another writer of the same content (``adopted``)."""

    sha256: str
    adopted: bool = False


def shard_name(start: int, end: int) -> str:
    return f"{start:08d}-{end:08d}.h5"


@contextlib.contextmanager
def open_h5(path: str | Path) -> Iterator[Any]:
    """An HDF5 file open for reading: local, or streamed from an object store."""
    import h5py

    if not files.is_remote(path):
        with h5py.File(path, "r") as f:
            yield f
        return
    with files.open_read(path) as fh, h5py.File(fh, "r") as f:
        yield f


def write_shard(path: str | Path, data: ShardData, *, not_before: float | None = None) -> Written:
    """Write a shard and publish it atomically; return the sha256 the writer computed.

    ``not_before``: a valid shard of the same key already at ``path`` is kept and adopted
    instead of being replaced when it was written after this time (a concurrent identical
    task) or is still the bytes its writer recorded (an identical job that finished earlier,
    before its collect recorded it in the manifest); only a broken or changed file is
    replaced. So a file never changes under a job that planned it as cached, and the
    checksum every job reports is the one of the file on disk.

    Raises:
        StoreError: the store cannot be written.
    """
    import h5py

    # The file is built in memory and written to disk with plain I/O: HDF5 writing straight to
    # a disk that fills up can crash the process (a segfault in its close), leaving debris and
    # a dead worker; a plain write fails with ENOSPC, cleanly.
    buf = io.BytesIO()
    with files.staged(path) as tmp:
        try:
            with h5py.File(buf, "w") as f:
                n, d = data.features.shape if data.features.ndim == 2 else (0, 0)
                # One chunk per shard-sized block of rows: written whole, read whole.
                f.create_dataset("features", data=data.features,
                                 chunks=(max(1, min(n, 1024)), max(1, d)) if n else None)
                if data.signatures is not None:
                    f.create_dataset("signatures", data=data.signatures.astype(np.float16))
                if data.details is not None:
                    f.create_dataset("details", data=data.details.astype(np.uint8))
                f.create_dataset("labels", data=data.labels.astype(np.int64))
                f.create_dataset("indices", data=data.indices.astype(np.int64))
                f.create_dataset("sample_ids", data=np.asarray(data.sample_ids, dtype=object),
                                 dtype=h5py.string_dtype())
                skipped = np.asarray([f"{sid}\t{why}" for sid, why in data.skipped],
                                     dtype=object)
                f.create_dataset("skipped", data=skipped, dtype=h5py.string_dtype(),
                                 shape=(len(skipped),))
                for key, value in data.attrs.items():
                    f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["rows"] = n
                f.attrs["created"] = time.time()
                f.attrs["complete"] = True
            payload = buf.getbuffer()
            with open(tmp, "wb") as fh:
                fh.write(payload)
        except OSError as exc:
            raise StoreError(f"cannot write shard {str(path)!r} ({exc}); fix: check the store "
                             "folder is writable and has free space") from None
        sha = hashlib.sha256(payload).hexdigest()
        del payload
        key = str(data.attrs.get("key", ""))
        record = {"sha256": sha, "rows": len(data.indices), "skipped": len(data.skipped),
                  "key": key}
        if files.publish(tmp, path, clobber=not_before is None):
            write_sidecar(path, record)
            return Written(sha)
        info = inspect(path, key, len(data.indices) + len(data.skipped))
        if info is not None and not_before is not None:
            theirs = read_sidecar(path)
            if files.mtime(path) >= not_before:
                return Written(theirs["sha256"] if theirs else files.sha256_of(path),
                               adopted=True)
            # written before this job was planned, by a job whose collect had not yet put it
            # in the manifest: still the bytes its writer recorded, so the same content.
            # Replacing it would change a file that a job planned since may hold as cached
            if theirs is not None and theirs.get("key") == key \
                    and files.sha256_of(path) == theirs["sha256"]:
                return Written(theirs["sha256"], adopted=True)
        files.publish(tmp, path, clobber=True)  # an old or broken file: replace it
        write_sidecar(path, record)
        return Written(sha)


def sidecar(path: str | Path) -> str:
    """Where a shard's writer leaves its checksum: ``.<name>.json`` beside the shard."""
    text = str(path)
    head, _, name = text.rpartition("/")
    return f"{head}/.{name}.json"


def write_sidecar(path: str | Path, record: dict[str, Any]) -> None:
    """The writer's checksum of the shard it published (read by the cache before the job's
    manifest exists: a failed job's finished shards are reused by its retry)."""
    files.write_text(sidecar(path), json.dumps(record, sort_keys=True))


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    text = files.read_text(sidecar(path))
    try:
        raw = json.loads(text) if text else None
    except ValueError:
        return None
    return raw if isinstance(raw, dict) and isinstance(raw.get("sha256"), str) else None


def inspect(path: str | Path, key: str | None, rows_expected: int | None = None
            ) -> ShardInfo | None:
    """The one validity check: a complete shard of content key ``key`` (any key when None)
    with consistent datasets and, when given, ``rows_expected`` rows + skipped samples.
    Reads attributes and small datasets only, not the features."""
    if not files.exists(path):
        return None
    try:
        with open_h5(path) as f:
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            rows = int(attrs.get("rows", -1))
            ok = bool(attrs.get("complete", False)) \
                and int(attrs.get("schema_version", -1)) == SCHEMA_VERSION \
                and (key is None or attrs.get("key") == key) \
                and f["features"].shape[0] == rows == f["indices"].shape[0] \
                == f["labels"].shape[0] == f["sample_ids"].shape[0]
            if not ok:
                return None
            parts = [s.split("\t", 1) for s in f["skipped"].asstr()[:]]
            if rows_expected is not None and rows + len(parts) != rows_expected:
                return None
            skipped = [{"id": p[0], "reason": p[1] if len(p) > 1 else ""} for p in parts]
            return ShardInfo(rows, skipped, attrs)
    except (OSError, KeyError, ValueError, TypeError):
        return None


def read_shard(path: str | Path) -> ShardData:
    """Read a whole shard.

    Raises:
        StoreError: the file is missing, truncated or not a complete featurefleet shard.
    """
    try:
        with open_h5(path) as f:
            if not f.attrs.get("complete", False):
                raise StoreError(f"shard {str(path)!r} is incomplete; fix: rerun the job to "
                                 "extract it again")
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            skipped = [s.split("\t", 1) for s in f["skipped"].asstr()[:]]
            return ShardData(
                features=f["features"][:], labels=f["labels"][:], indices=f["indices"][:],
                sample_ids=list(f["sample_ids"].asstr()[:]),
                skipped=[(s[0], s[1] if len(s) > 1 else "") for s in skipped], attrs=attrs)
    except (OSError, KeyError) as exc:
        raise StoreError(f"shard {str(path)!r} is unreadable ({exc}); fix: delete it and rerun "
                         "the job, or run featurefleet cache verify") from None


class ShardReader:
    """Shards read as one table, in order, with bounded memory.

    :meth:`chunks` streams ``(features float32, labels, indices)`` at most ``max_rows`` rows at
    a time, keeping only the rows whose sample index is in ``wanted`` when it is given;
    :meth:`read` fills one preallocated array with them. ``field``: the per-row array read as
    "features" (``signatures`` for the image signatures, ``details`` for the images' 64 x 64
    pictures).
    """

    def __init__(self, paths: list[str], wanted: np.ndarray | None = None,
                 field: str = "features") -> None:
        self.paths = list(paths)
        self.field = field
        self.wanted = None if wanted is None else np.unique(np.asarray(wanted, np.int64))
        self.dim = 0
        self.rows = 0
        self._masks: list[np.ndarray | None] = []
        for p in self.paths:
            try:
                with open_h5(p) as f:
                    if field not in f:
                        raise KeyError(f"no {field!r} dataset (written by an older version)")
                    self.dim = int(f[field].shape[1]) if f[field].ndim == 2 else 0
                    if self.wanted is None:
                        self._masks.append(None)
                        self.rows += int(f["features"].shape[0])
                    else:
                        mask = np.isin(f["indices"][:], self.wanted, assume_unique=False)
                        self._masks.append(mask)
                        self.rows += int(mask.sum())
            except (OSError, KeyError) as exc:
                raise StoreError(f"shard {p!r} is unreadable ({exc}); fix: delete it and rerun "
                                 "the job, or run featurefleet cache verify") from None

    def chunks(self, max_rows: int = 65536, dtype: Any = np.float32
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for p, mask in zip(self.paths, self._masks, strict=True):
            if mask is not None and not mask.any():
                continue
            with open_h5(p) as f:
                n = int(f["features"].shape[0])
                for s in range(0, n, max_rows):
                    e = min(n, s + max_rows)
                    x = f[self.field][s:e].astype(dtype, copy=False)
                    y, idx = f["labels"][s:e], f["indices"][s:e]
                    if mask is not None:
                        m = mask[s:e]
                        x, y, idx = x[m], y[m], idx[m]
                    if len(idx):
                        yield x, y, idx

    def sample_ids(self) -> list[str]:
        """The sample ids of the rows :meth:`chunks` yields, in the same order."""
        out: list[str] = []
        for p, mask in zip(self.paths, self._masks, strict=True):
            if mask is not None and not mask.any():
                continue
            with open_h5(p) as f:
                ids = np.asarray(f["sample_ids"].asstr()[:], dtype=object)
            out.extend(str(i) for i in (ids[mask] if mask is not None else ids))
        return out

    def read(self, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every wanted row in one array (``dtype=np.float16`` halves it: the stored dtype)."""
        x = np.empty((self.rows, self.dim), dtype)
        y = np.empty(self.rows, np.int64)
        idx = np.empty(self.rows, np.int64)
        at = 0
        for fx, fy, fi in self.chunks(16384, dtype):  # small chunks: a small temporary
            x[at: at + len(fy)], y[at: at + len(fy)], idx[at: at + len(fy)] = fx, fy, fi
            at += len(fy)
        return x, y, idx


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
