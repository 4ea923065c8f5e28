"""Data sources: a registry of readers that give labels, sample ids and decoded samples.

Every source answers the same small interface (:class:`Source`): how many samples, their
labels, the class names, optional predefined splits, each sample's stored bytes (``raw``) or
cheap stamp (``stat``), and ``load(indices)`` which decodes those samples (RGB ``uint8`` arrays
for images). A sample that cannot be decoded is returned as a failure (index + reason), never
raised: the shard records it.

Each sample has a digest (:func:`digests`): a hash of its bytes (``data.fingerprint: content``,
the default) or of its size and modification time (``stat``). The planner computes them once;
they find exact duplicates, make the cache key, and let a worker check that every sample it
decodes is the one that was planned (:class:`Verified`).

One module per source; each registers itself by name with :func:`register`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.spec import DataSpec

SPLIT_NAMES = ("train", "val", "test")
DIGEST_BYTES = 16


# The one rule for what a source materialises: bound what is *decoded*, not what is on disk
# (a 3 MB gzip tar can hold a 3 GiB member, a 224 KB Parquet file 2 GB of strings). One sample
# larger than this is a recorded skip, read no further; a table larger than MAX_TABLE_BYTES
# decoded is refused before it is decoded.
MAX_SAMPLE_BYTES = 256 << 20  # an image file (a 150 MP PNG is ~100 MB) or a text (1 MiB)
MAX_TABLE_BYTES = 512 << 20  # a text table, decoded (larger: split it, or use .tar shards)


IGNORED_NAMES = frozenset({"__MACOSX", "__pycache__", "Thumbs.db", "desktop.ini"})


def visible(name: str) -> bool:
    """Not hidden (``.``), not an OS's debris (``__MACOSX`` of a zip made on a Mac...)."""
    return not name.startswith(".") and name not in IGNORED_NAMES


def subfolders(base: Path) -> list[Path]:
    """The visible subfolders of ``base`` (class or split folders), sorted."""
    return sorted(p for p in base.iterdir() if p.is_dir() and visible(p.name))


def files_under(root: Path, base: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``base`` (recursively, sorted) whose name ends with one of ``suffixes``;
    hidden files and folders and OS debris left out. A file that is (or sits behind) a link
    leading outside ``root`` is refused: a data folder never reads what it does not hold.

    Raises:
        DataError: a link out of ``root``, naming it.
    """
    top = root.resolve()

    def outside(path: Path) -> None:
        if not path.resolve().is_relative_to(top):
            raise DataError(f"{str(path)!r} leads outside the data folder {str(root)!r} "
                            f"(a link to {str(path.resolve())!r}); fix: copy the file into "
                            "the folder, or remove the link")

    outside(base)  # os.walk descends into no linked folder: only base and linked files can
    out = []       # lead out, so only they are resolved (one lstat per file otherwise)
    for dirpath, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if visible(d))
        for name in sorted(names):
            if not visible(name) or not name.lower().endswith(suffixes):
                continue
            path = Path(dirpath) / name
            if path.is_symlink():
                outside(path)
            out.append(path)
    return out


def digest_of(data: bytes) -> bytes:
    """A sample's 16-byte digest (BLAKE2b: fast, and collisions are not a concern)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def digest_stream(fh: Any, limit: int, chunk: int = 1 << 20) -> bytes:
    """:func:`digest_of` of what ``fh`` yields, read in chunks (bounded memory); at most
    ``limit`` bytes are read (a larger sample is a skip at extraction: its digest is never
    compared)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    left = limit
    while left > 0:
        block = fh.read(min(chunk, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.digest()


@dataclass
class Loaded:
    """Decoded samples for some indices, the ones that failed (index, reason), and the digest
    of the bytes each decoded sample came from (aligned with ``indices``)."""

    indices: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # (H, W, 3) uint8 per image, or a str
    failures: list[tuple[int, str]] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    cpu_seconds: float = 0.0  # CPU time the decoding thread spent on them


class Source:
    """The interface every data source implements."""

    labels: np.ndarray  # int64, one per sample
    class_names: list[str]
    modality: str = "image"
    kind: str = "source"

    def __len__(self) -> int:
        return len(self.labels)

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        """Index arrays per split when the data comes split (e.g. train/ test/ folders)."""
        return None

    def sample_id(self, index: int) -> str:
        return str(index)

    def raw(self, index: int) -> bytes:
        """The sample's stored bytes, exactly as ``load`` reads them."""
        raise NotImplementedError

    def stat(self, index: int) -> bytes:
        """A cheap stamp of the sample (size, modification time): ``data.fingerprint: stat``.
        Sources held in memory stamp the bytes themselves."""
        return self.raw(index)

    def text_length(self, index: int) -> int:
        """A cheap size of a text sample (extraction batches texts of similar length)."""
        return 0

    def digest_table(self, mode: str) -> np.ndarray | None:
        """Every sample's digest when the source already computed them (a tar read whole to
        be indexed), else None."""
        return None

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        """Decode the samples at ``indices``; ``min_size``: the smallest side the consumer
        needs (a JPEG may be decoded at a reduced scale, never below it)."""
        raise NotImplementedError

    def load_encoded(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        """As :meth:`load`, but JPEG files come back undecoded (``decode.Encoded``, header
        checked) for a batched decode on the GPU; sources without files decode as usual."""
        return self.load(indices, min_size)


def digests(source: Source, indices: Sequence[int], mode: str = "content",
            threads: int = 16) -> np.ndarray:
    """``(len(indices), 16)`` uint8 digests of the samples' bytes (``content``) or stamps
    (``stat``); read in threads (file systems answer many reads at once). A sample that cannot
    be read gets a digest of its index and error (unique: unreadable samples are not each
    other's duplicates)."""
    table = source.digest_table(mode)
    if table is not None:
        return table[np.asarray(indices, dtype=np.int64)]
    read = source.raw if mode == "content" else source.stat

    def one(i: int) -> bytes:
        try:
            return digest_of(read(int(i)))
        except Exception as exc:  # an unreadable sample is a recorded skip later, not here
            return digest_of(f"unreadable {i}: {type(exc).__name__}".encode())

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ff-digest") as pool:
        got = list(pool.map(one, indices, chunksize=64))
    return np.frombuffer(b"".join(got), np.uint8).reshape(-1, DIGEST_BYTES) if got else \
        np.zeros((0, DIGEST_BYTES), np.uint8)


class Verified(Source):
    """A source whose every loaded sample is checked against the digest planned for it: data
    that changed after planning fails the task instead of mixing old and new samples."""

    def __init__(self, inner: Source, expected: np.ndarray, mode: str) -> None:
        self.inner = inner
        self.expected = expected
        self.mode = mode
        self.labels = inner.labels
        self.class_names = inner.class_names
        self.modality = inner.modality

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        return self.inner.predefined_splits()

    def sample_id(self, index: int) -> str:
        return self.inner.sample_id(index)

    def text_length(self, index: int) -> int:
        return self.inner.text_length(index)

    def raw(self, index: int) -> bytes:
        return self.inner.raw(index)

    def stat(self, index: int) -> bytes:
        return self.inner.stat(index)

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        return self._checked(self.inner.load(indices, min_size))

    def load_encoded(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        return self._checked(self.inner.load_encoded(indices, min_size))

    def _checked(self, out: Loaded) -> Loaded:
        if self.mode == "content":
            got = out.digests
        else:
            got = [digest_of(self.inner.stat(i)) for i in out.indices]
        changed = [i for i, d in zip(out.indices, got, strict=True)
                   if d != self.expected[i].tobytes()]
        if changed:
            raise DataError(f"{len(changed)} sample(s) changed since the job was planned, e.g. "
                            f"{self.inner.sample_id(changed[0])!r}; fix: submit the job again")
        return out


Factory = Callable[[DataSpec], Source]
_SOURCES: dict[str, Factory] = {}
# Modules that register sources when imported (imported on first use, not at import time).
_MODULES = ("arrays", "audio", "folder", "manifest", "text", "tv", "webdataset")


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a source factory under ``name`` (the spec's ``data.source``)."""

    def wrap(fn: Factory) -> Factory:
        _SOURCES[name] = fn
        return fn

    return wrap


def registered() -> dict[str, Factory]:
    for mod in _MODULES:
        importlib.import_module(f"pipeline.sources.{mod}")
    return _SOURCES


def open_source(spec: DataSpec) -> Source:
    """Open the data source a spec names.

    Raises:
        DataError: the path is missing, empty, or holds unusable data.
    """
    sources = registered()
    try:
        factory = sources[spec.source]
    except KeyError:
        raise DataError(f"unknown data source {spec.source!r}; fix: use one of "
                        f"{', '.join(sorted(sources))}") from None
    source = factory(spec)
    source.kind = spec.source
    return source


@functools.lru_cache(maxsize=4)
def cached_source(spec: DataSpec) -> Source:
    """A source opened once per worker process."""
    return open_source(spec)


def checked_source(spec: DataSpec, n_samples: int, class_names: list[str],
                   expected: np.ndarray, mode: str) -> Source:
    """The process's source for ``spec`` (reopened once if its listing changed since it was
    opened), wrapped to check every loaded sample against the planned digests.

    Raises:
        DataError: the data no longer has the planned samples and classes.
    """
    source = cached_source(spec)
    if len(source) != n_samples or source.class_names != class_names:
        cached_source.cache_clear()
        source = cached_source(spec)
        if len(source) != n_samples or source.class_names != class_names:
            raise DataError(f"data at {spec.path or spec.source!r} changed since the job was "
                            f"planned ({len(source)} samples, {len(source.class_names)} classes "
                            f"now; {n_samples} and {len(class_names)} then); fix: submit the "
                            "job again")
    return Verified(source, expected, mode)


def class_index(raw_labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Class names (numeric labels keep their numeric order) and each sample's class index.

    Raises:
        DataError: a label that is not valid UTF-8 (undecodable bytes in a table cell or a
            folder name): it could not be written to the report or the head.
    """
    names = set(raw_labels)
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", errors="backslashreplace").decode()
            raise DataError(f"label {shown[:80]!r} is not valid UTF-8; fix: re-encode the "
                            "data's labels (table cells or class folder names) as UTF-8"
                            ) from None
    numeric = all(c.isdigit() for c in names)
    ordered = sorted(names, key=int) if numeric else sorted(names)
    index = {c: i for i, c in enumerate(ordered)}
    return ordered, np.asarray([index[c] for c in raw_labels], dtype=np.int64)


def failure(index: int, exc: BaseException) -> tuple[int, str]:
    """A recorded skip: the sample's index and a short, readable reason."""
    from pipeline.sources.decode import reason

    return int(index), reason(exc)


BUILTIN_SOURCES = ("digits",)


def guess_source(data: str, modality: str = "image") -> str:
    """The source kind for a path given on the command line (``predict --data``): a folder
    of images (``imagefolder`` when it holds only class subfolders, else ``images``) or of
    ``.txt`` files, a table (image paths: ``manifest``; texts: ``text``), a ``.tar``
    (``webdataset``), or a built-in set's name.

    Raises:
        DataError: nothing there, or a file of a kind no source reads.
    """
    if data in BUILTIN_SOURCES:
        return data
    path = Path(data).expanduser()
    if path.is_dir():
        if modality == "text":
            return "text"
        entries = [p for p in path.iterdir() if visible(p.name)]
        top_files = [p for p in entries if not p.is_dir()]
        classes = bool(entries) and not top_files and len(entries) >= 2
        if modality == "audio":
            return "audiofolder" if classes else "audio"
        return "imagefolder" if classes else "images"
    if not path.is_file():
        raise DataError(f"data {data!r} does not exist; fix: pass a folder, a table "
                        "(.csv/.jsonl/.parquet), a .tar, or digits")
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix in (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"):
        return "text" if modality == "text" else "manifest"
    raise DataError(f"cannot tell what kind of data {data!r} is ({suffix or 'no suffix'}); "
                    "fix: pass --source (images, imagefolder, manifest, text, webdataset)")
