"""Images in a folder: ``imagefolder`` (``root/<class>/<image>``, or
``root/{train,val,test}/<class>/<image>``) and ``images`` (every image under ``root``, no
labels: for pretraining)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import (
    SPLIT_NAMES,
    Loaded,
    Source,
    digest_of,
    failure,
    files_under,
    register,
    subfolders,
)
from pipeline.sources.decode import (
    IMAGE_EXTENSIONS,
    decode_image,
    encoded_or_decoded,
    read_bytes,
)
from pipeline.spec import DataSpec


def decode_files(paths: Sequence[Path], indices: Sequence[int],
                 min_size: int | None = None, encoded: bool = False) -> Loaded:
    """Decode image files; an unreadable one becomes a recorded failure, not an exception.
    Each decoded image's digest is of the very bytes it was decoded from. ``encoded``: JPEGs
    stay undecoded (for the device)."""
    out = Loaded()
    decode = encoded_or_decoded if encoded else decode_image
    for path, i in zip(paths, indices, strict=True):
        try:
            raw = read_bytes(path)
            out.images.append(decode(raw, min_size))
            out.indices.append(int(i))
            out.digests.append(digest_of(raw))
        except Exception as exc:  # a bad file is data, not a crash
            out.failures.append(failure(i, exc))
    return out


def file_stat(path: Path) -> bytes:
    """A file's size and modification time (``data.fingerprint: stat``)."""
    st = os.stat(path)
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()


class FileSource(Source):
    """Images (or, in a subclass, other files) listed as files under a root folder."""

    root: Path
    files: list[str]
    suffixes: tuple[str, ...] = IMAGE_EXTENSIONS  # what the folder's samples end with
    what = "image"  # how errors name a sample
    plural = "images"

    def raw(self, index: int) -> bytes:
        return read_bytes(self.root / self.files[index])

    def stat(self, index: int) -> bytes:
        return file_stat(self.root / self.files[index])

    def sample_id(self, index: int) -> str:
        return self.files[index]

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        return decode_files([self.root / self.files[i] for i in indices], indices, min_size)

    def load_encoded(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        return decode_files([self.root / self.files[i] for i in indices], indices, min_size,
                            encoded=True)


class ImagesSource(FileSource):
    """Every image (or, in a subclass, other sample file) under ``root`` (recursively, hidden
    files left out), one class: unlabeled data for pretraining and batch prediction."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"{self.what} folder {str(root)!r} does not exist; fix: set "
                            f"data.path to a folder of {self.what} files")
        self.root = root
        self.files = [str(p.relative_to(root)) for p in files_under(root, root, self.suffixes)]
        if not self.files:
            raise DataError(f"{self.what} folder {str(root)!r} holds no {self.plural}; fix: "
                            f"add {'/'.join(self.suffixes[:4])} files (any subfolders)")
        self.labels = np.zeros(len(self.files), dtype=np.int64)
        self.class_names = ["unlabeled"]


class FolderSource(FileSource):
    """One subfolder per class, optionally inside train/ val/ test/ folders."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"{self.what} folder {str(root)!r} does not exist; fix: set "
                            "data.path to a folder with one subfolder per class")
        split_dirs = [d for d in SPLIT_NAMES if (root / d).is_dir()]
        self.root = root
        groups = split_dirs or [""]
        classes = sorted({c.name for g in groups for c in subfolders(root / g)})
        if not classes:
            raise DataError(f"{self.what} folder {str(root)!r} has no class subfolders; fix: put "
                            f"the {self.plural} in one subfolder per class (root/cat/1"
                            f"{self.suffixes[0]}, root/dog/2{self.suffixes[0]})")
        self.class_names = classes
        files: list[str] = []
        labels: list[int] = []
        split_of: list[str] = []
        for g in groups:
            for ci, cname in enumerate(classes):
                cdir = root / g / cname
                if not cdir.is_dir():
                    continue
                for path in files_under(root, cdir, self.suffixes):
                    files.append(os.path.relpath(path, root))
                    labels.append(ci)
                    split_of.append(g)
        if not files:
            raise DataError(f"{self.what} folder {str(root)!r} holds no {self.plural} "
                            f"({', '.join(classes)} are empty); fix: add "
                            f"{'/'.join(self.suffixes[:4])} files")
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self._split_of = np.asarray(split_of)
        self._split_dirs = split_dirs

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        if not self._split_dirs:
            return None
        splits = {d: np.flatnonzero(self._split_of == d) for d in self._split_dirs}
        if "train" not in splits:
            raise DataError(f"{self.what} folder {str(self.root)!r} has "
                            f"{'/'.join(self._split_dirs)} but no train/ folder; fix: add "
                            "root/train/<class>/...")
        return splits


@register("imagefolder")
def _imagefolder(spec: DataSpec) -> Source:
    return FolderSource(Path(str(spec.path)))


@register("images")
def _images(spec: DataSpec) -> Source:
    return ImagesSource(Path(str(spec.path)))
