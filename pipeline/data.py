"""Data sources: a registry of readers that give labels, splits and decoded RGB images.

Every source answers the same small interface (:class:`Source`): how many samples, their labels,
the class names, a fingerprint of the data (for the cache key), optional predefined splits, and
``load(indices)`` which decodes those samples to RGB ``uint8`` arrays (H, W, 3). A sample that
cannot be decoded is returned as a failure (index + reason), never raised: the shard records it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.spec import DataSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
SPLIT_DIRS = ("train", "val", "test")


@dataclass
class Loaded:
    """Decoded images for some indices, plus the ones that failed (index, reason)."""

    indices: list[int]
    images: list[np.ndarray]
    failures: list[tuple[int, str]]


class Source:
    """The interface every data source implements."""

    labels: np.ndarray  # int64, one per sample
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        """Index arrays per split when the data comes split (e.g. train/ test/ folders)."""
        return None

    def sample_id(self, index: int) -> str:
        return str(index)

    def load(self, indices: Sequence[int]) -> Loaded:
        raise NotImplementedError


_SOURCES: dict[str, Callable[[DataSpec], Source]] = {}


def register(name: str) -> Callable[[Callable[[DataSpec], Source]], Callable[[DataSpec], Source]]:
    def wrap(fn: Callable[[DataSpec], Source]) -> Callable[[DataSpec], Source]:
        _SOURCES[name] = fn
        return fn

    return wrap


def open_source(spec: DataSpec) -> Source:
    """Open the data source a spec names.

    Raises:
        DataError: the path is missing, empty, or holds unusable data.
    """
    try:
        factory = _SOURCES[spec.source]
    except KeyError:
        raise DataError(f"unknown data source {spec.source!r}; fix: use one of "
                        f"{', '.join(sorted(_SOURCES))}") from None
    return factory(spec)


def split_indices(source: Source, spec: DataSpec) -> dict[str, np.ndarray]:
    """Train/test index arrays: the source's own splits, else a seeded stratified split.

    Raises:
        DataError: too few samples or classes to split.
    """
    labels = source.labels
    rng = np.random.default_rng(spec.seed)
    splits = source.predefined_splits()
    if splits is None:
        pool = np.arange(len(labels))
        if spec.limit is not None and spec.limit < len(pool):
            pool = np.sort(_stratified_pick(labels, pool, spec.limit, rng))
        test = _stratified_pick(labels, pool, round(len(pool) * spec.test_fraction), rng)
        train = np.setdiff1d(pool, test)
        splits = {"train": train, "test": np.sort(test)}
    elif spec.limit is not None:
        splits = {k: np.sort(_stratified_pick(labels, v, min(len(v), spec.limit), rng))
                  for k, v in splits.items()}
    if "test" not in splits:
        train = splits["train"]
        test = _stratified_pick(labels, train, round(len(train) * spec.test_fraction), rng)
        splits = {**splits, "train": np.setdiff1d(train, test), "test": np.sort(test)}
    classes = np.unique(labels[splits["train"]])
    if len(classes) < 2:
        raise DataError(f"the training split has {len(classes)} class(es) "
                        f"({len(splits['train'])} samples); fix: a classifier needs at least two "
                        "classes with samples each")
    if len(splits["test"]) == 0:
        raise DataError(f"the test split is empty ({len(labels)} samples in all); fix: add "
                        "samples or raise data.test_fraction")
    return {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}


def _stratified_pick(labels: np.ndarray, pool: np.ndarray, n: int,
                     rng: np.random.Generator) -> np.ndarray:
    """``n`` indices from ``pool`` with class proportions kept (largest remainders)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(labels[pool], return_counts=True)
    exact = counts * n / len(pool)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    picked = [rng.permutation(pool[labels[pool] == c])[:k]
              for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """One image array (HW, HWC or CHW; uint8, uint16 or float) as RGB uint8 (H, W, 3)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # CHW -> HWC
    if a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0).round()
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError("image holds NaN or infinite values")
        hi = float(a.max()) if a.size else 1.0
        a = a * 255.0 if hi <= 1.0 else a
    a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array has shape {array.shape}, expected HW, HWC or CHW")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:  # composite over white: transparent pixels must not turn black
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = (a[:, :, :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_image(path: str | Path | Any) -> np.ndarray:
    """Decode an image file (a path or a binary file object) of any common mode to RGB uint8,
    EXIF rotation applied.

    JPEG goes through torchvision's libjpeg-turbo decoder (the same pixels as Pillow's, checked
    over baseline, progressive, 4:4:4/4:2:2/4:2:0, grayscale, CMYK and all EXIF orientations;
    1.5-2x faster, and it holds the GIL less, which matters to the decode threads). Any other
    format, and any JPEG it refuses (a truncated file), goes through Pillow, whose error is the
    one reported.
    """
    import io

    raw = Path(path).read_bytes() if isinstance(path, (str, Path)) else path.read()
    if raw[:3] == JPEG_MAGIC:
        fast = _decode_jpeg(raw)
        if fast is not None:
            return fast
    return _decode_pil(io.BytesIO(raw))


def _decode_jpeg(raw: bytes) -> np.ndarray | None:
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        chw = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                          mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception:  # Pillow decodes it or says why not
        return None
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())


def _decode_pil(fh: Any) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(fh) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            scale = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
            return to_rgb_uint8((arr / scale * 255.0).round().astype(np.uint8))
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            return to_rgb_uint8(np.asarray(im.convert("RGBA")))
        return np.asarray(im.convert("RGB"))


def _decode_files(paths: Sequence[Path], indices: Sequence[int]) -> Loaded:
    """Decode image files; an unreadable one becomes a recorded failure, not an exception."""
    out = Loaded([], [], [])
    for path, i in zip(paths, indices, strict=True):
        try:
            out.images.append(decode_image(path))
            out.indices.append(int(i))
        except Exception as exc:  # a bad file is data, not a crash
            out.failures.append((int(i), f"{exc.__class__.__name__}: {exc}"[:300]))
    return out


# --- sources ------------------------------------------------------------------------------


class ArraySource(Source):
    """In-memory image arrays with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                 fingerprint: str) -> None:
        self.images = images
        self.labels = labels
        self.class_names = class_names
        self._fingerprint = fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def load(self, indices: Sequence[int]) -> Loaded:
        out = Loaded([], [], [])
        for i in indices:
            try:
                out.images.append(to_rgb_uint8(self.images[i]))
                out.indices.append(int(i))
            except ValueError as exc:
                out.failures.append((int(i), str(exc)))
        return out


@register("digits")
def _digits(spec: DataSpec) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 8x8 grey values 0..16 -> uint8 0..255; upsampled later like any small image.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    fp = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return ArraySource(images, labels, [str(c) for c in d.target_names], "digits:" + fp)


@register("npz")
def _npz(spec: DataSpec) -> Source:
    path = Path(str(spec.path))
    if not path.is_file():
        raise DataError(f"NPZ file {str(path)!r} does not exist; fix: set data.path to an .npz "
                        "file holding 'images' and 'labels' arrays")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise DataError(f"{str(path)!r} is not a readable .npz file ({exc}); fix: save it with "
                        "numpy.savez(path, images=..., labels=...)") from None
    return _array_source(path, arrays, "npz", "numpy.savez(path, images=..., labels=...)")


@register("hdf5")
def _hdf5(spec: DataSpec) -> Source:
    import h5py

    path = Path(str(spec.path))
    if not path.is_file():
        raise DataError(f"HDF5 file {str(path)!r} does not exist; fix: set data.path to an .h5 "
                        "file with 'images' and 'labels' datasets")
    try:
        with h5py.File(path, "r") as f:
            arrays = {k: f[k][()] for k in ("images", "labels", "class_names") if k in f}
    except OSError as exc:
        raise DataError(f"{str(path)!r} is not a readable HDF5 file ({exc}); fix: write it with "
                        "h5py (datasets 'images' and 'labels')") from None
    if "class_names" in arrays:
        arrays["class_names"] = np.asarray([c.decode() if isinstance(c, bytes) else str(c)
                                            for c in arrays["class_names"]])
    return _array_source(path, arrays, "hdf5", "h5py datasets 'images' and 'labels'")


def _array_source(path: Path, arrays: dict[str, np.ndarray], kind: str, how: str) -> Source:
    how = f"store {how}"
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise DataError(f"{str(path)!r} lacks array(s) {missing} (has {sorted(arrays)}); fix: "
                        f"{how}")
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise DataError(f"{str(path)!r} has {len(images)} images but {len(labels)} labels; "
                        "fix: give exactly one label per image")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{str(path)!r} labels have dtype {labels.dtype}, not integers; fix: "
                        "store class indices 0..K-1 (and class names in 'class_names')")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = int(np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(1))[0])
        raise DataError(f"{str(path)!r} images hold NaN/inf (first at sample {bad}); fix: "
                        "clean or drop those samples")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else \
        [str(i) for i in range(n_classes)]
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    if images.ndim not in (3, 4):
        raise DataError(f"{str(path)!r} images have shape {images.shape}; fix: use N x H x W "
                        "(grey), N x H x W x C (uint8 HWC) or N x C x H x W (float CHW)")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{str(path)!r} has negative label {int(labels.min())}; fix: use class "
                        "indices 0..K-1")
    return ArraySource(images, labels.astype(np.int64), names, f"{kind}:" + digest)


class FolderSource(Source):
    """ImageFolder: ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist; fix: set data.path to a "
                            "folder with one subfolder per class")
        split_dirs = [d for d in SPLIT_DIRS if (root / d).is_dir()]
        self.root = root
        groups = split_dirs or [""]
        classes = sorted({c.name for g in groups for c in (root / g).iterdir() if c.is_dir()
                          and not c.name.startswith(".")})
        if not classes:
            raise DataError(f"image folder {str(root)!r} has no class subfolders; fix: put the "
                            "images in one subfolder per class (root/cat/1.jpg, root/dog/2.jpg)")
        self.class_names = classes
        files: list[str] = []
        labels: list[int] = []
        split_of: list[str] = []
        for g in groups:
            for ci, cname in enumerate(classes):
                cdir = root / g / cname
                if not cdir.is_dir():
                    continue
                for dirpath, _dirs, names in sorted(os.walk(cdir)):
                    rel_dir = os.path.relpath(dirpath, root)
                    for fname in sorted(names):
                        if fname.lower().endswith(IMAGE_EXTENSIONS):
                            files.append(os.path.join(rel_dir, fname))
                            labels.append(ci)
                            split_of.append(g)
        if not files:
            raise DataError(f"image folder {str(root)!r} holds no images ({', '.join(classes)}"
                            f" are empty); fix: add {'/'.join(IMAGE_EXTENSIONS[:4])} files")
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self._split_of = np.asarray(split_of)
        self._split_dirs = split_dirs

    def fingerprint(self) -> str:
        digest, root = hashlib.sha256(), str(self.root)
        for rel in self.files:
            st = os.stat(os.path.join(root, rel))
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "folder:" + digest.hexdigest()

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        if not self._split_dirs:
            return None
        splits = {d: np.flatnonzero(self._split_of == d) for d in self._split_dirs}
        if "train" not in splits:
            raise DataError(f"image folder {str(self.root)!r} has {'/'.join(self._split_dirs)} "
                            "but no train/ folder; fix: add root/train/<class>/...")
        return splits

    def sample_id(self, index: int) -> str:
        return self.files[index]

    def load(self, indices: Sequence[int]) -> Loaded:
        return _decode_files([self.root / self.files[i] for i in indices], indices)


@register("imagefolder")
def _imagefolder(spec: DataSpec) -> Source:
    return FolderSource(Path(str(spec.path)))



class ManifestSource(Source):
    """A CSV or JSONL list of ``path,label[,split]``; relative paths resolve against the file."""

    def __init__(self, manifest: Path) -> None:
        if not manifest.is_file():
            raise DataError(f"manifest {str(manifest)!r} does not exist; fix: set data.path to a "
                            ".csv or .jsonl file with path,label[,split] columns")
        rows = _read_manifest(manifest)
        if not rows:
            raise DataError(f"manifest {str(manifest)!r} has no rows; fix: add one line per "
                            "image: path,label[,split]")
        root = manifest.parent.resolve()
        self.root = root
        self.files: list[Path] = []
        labels: list[str] = []
        splits: list[str] = []
        for n, row in enumerate(rows, start=2 if manifest.suffix == ".csv" else 1):
            missing = [c for c in ("path", "label") if not str(row.get(c, "") or "").strip()]
            if missing:
                raise DataError(f"manifest {str(manifest)!r} line {n} lacks {missing} ({row}); "
                                "fix: give every line a path and a label")
            p = (root / str(row["path"])).resolve()
            if not p.is_relative_to(root):
                raise DataError(f"manifest {str(manifest)!r} line {n}: path {row['path']!r} "
                                f"points outside {str(root)!r}; fix: keep images under the "
                                "manifest's folder")
            split = str(row.get("split") or "train").strip()
            if split not in SPLIT_DIRS:
                raise DataError(f"manifest {str(manifest)!r} line {n}: unknown split {split!r};"
                                f" fix: use one of {', '.join(SPLIT_DIRS)}")
            self.files.append(p)
            labels.append(str(row["label"]).strip())
            splits.append(split)
        names = set(labels)
        numeric = all(c.isdigit() for c in names)  # 0..K-1 keep their numeric order
        self.class_names = sorted(names, key=int) if numeric else sorted(names)
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels = np.asarray([index[c] for c in labels], dtype=np.int64)
        self._splits = np.asarray(splits)
        self._has_splits = any("split" in r and r["split"] for r in rows)
        self.manifest = manifest

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.manifest.read_bytes())
        for p in self.files:
            try:
                st = p.stat()
                digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{p}\0missing\n".encode())
        return "manifest:" + digest.hexdigest()

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        if not self._has_splits:
            return None
        found = {s: np.flatnonzero(self._splits == s) for s in SPLIT_DIRS}
        found = {s: v for s, v in found.items() if len(v)}
        if "train" not in found:
            raise DataError(f"manifest {str(self.manifest)!r} has no 'train' rows; fix: mark "
                            "training images with split=train")
        return found

    def sample_id(self, index: int) -> str:
        return os.path.relpath(self.files[index], self.root)

    def load(self, indices: Sequence[int]) -> Loaded:
        return _decode_files([self.files[i] for i in indices], indices)


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    import csv
    import json

    text = path.read_text()
    if path.suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"manifest {str(path)!r} line {n} is not JSON ({exc}); fix: one "
                                'object per line: {"path": ..., "label": ...}') from None
            if not isinstance(row, dict):
                raise DataError(f"manifest {str(path)!r} line {n} is not an object; fix: one "
                                'object per line: {"path": ..., "label": ...}')
            rows.append(row)
        return rows
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
        raise DataError(f"manifest {str(path)!r} has columns {reader.fieldnames}; fix: start it "
                        "with a header line path,label[,split]")
    return list(reader)


@register("manifest")
def _manifest(spec: DataSpec) -> Source:
    return ManifestSource(Path(str(spec.path)))


class TorchvisionSource(Source):
    """A torchvision dataset by class name, all of its splits; ``download`` where there is
    internet, else a root folder already in the dataset's own layout."""

    def __init__(self, name: str, root: Path, download: bool) -> None:
        import inspect

        from torchvision import datasets

        cls = getattr(datasets, name, None)
        if not (inspect.isclass(cls)):
            raise DataError(f"unknown torchvision dataset {name!r}; fix: use a class name from "
                            "torchvision.datasets, e.g. CIFAR10, CIFAR100, STL10, Flowers102")
        params = inspect.signature(cls.__init__).parameters
        parts: dict[str, Any] = {}
        errors = []
        if "train" in params:
            options = {"train": {"train": True}, "test": {"train": False}}
        else:
            options = {"train": {"split": "train"}, "trainval": {"split": "trainval"},
                       "val": {"split": "val"}, "test": {"split": "test"}}
        for split, kw in options.items():
            try:
                parts["train" if split == "trainval" else split] = cls(
                    root=str(root), download=download, **kw)
            except (RuntimeError, ValueError, OSError, FileNotFoundError) as exc:
                errors.append(f"{split}: {str(exc).splitlines()[0][:120]}")
        if "train" not in parts:
            raise DataError(f"torchvision {name} not found under {str(root)!r} ({'; '.join(errors)}"
                            "); fix: set data.download: true where there is internet, or put the "
                            "dataset files in that folder in torchvision's layout")
        self.name, self.root = name, root
        self.parts = list(parts.items())
        labels, splits = [], []
        for split, ds in self.parts:
            lab = _dataset_labels(ds)
            labels.append(lab)
            splits.extend([split] * len(lab))
        self.labels = np.concatenate(labels).astype(np.int64)
        self._splits = np.asarray(splits)
        first = self.parts[0][1]
        classes = getattr(first, "classes", None)
        k = int(self.labels.max()) + 1
        self.class_names = [str(c) for c in classes] if classes and len(classes) >= k else \
            [str(i) for i in range(k)]
        self._offsets = np.cumsum([0] + [len(ds) for _, ds in self.parts])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        for dirpath, _dirs, names in sorted(os.walk(self.root)):
            for fname in sorted(names):
                st = os.stat(os.path.join(dirpath, fname))
                digest.update(f"{dirpath}/{fname}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "torchvision:" + digest.hexdigest()

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        return {s: np.flatnonzero(self._splits == s) for s, _ in self.parts}

    def load(self, indices: Sequence[int]) -> Loaded:
        out = Loaded([], [], [])
        for i in indices:
            part = int(np.searchsorted(self._offsets, i, side="right")) - 1
            ds = self.parts[part][1]
            j = int(i - self._offsets[part])
            try:
                data = getattr(ds, "data", None)
                if isinstance(data, np.ndarray) or hasattr(data, "numpy"):
                    arr = np.asarray(data[j])  # MNIST/CIFAR keep decoded arrays: no PIL round trip
                    arr = arr.transpose(1, 2, 0) if arr.ndim == 3 and arr.shape[0] == 3 else arr
                    out.images.append(to_rgb_uint8(arr))
                else:
                    out.images.append(np.asarray(ds[j][0].convert("RGB")))
                out.indices.append(int(i))
            except Exception as exc:
                out.failures.append((int(i), f"{exc.__class__.__name__}: {exc}"[:300]))
        return out


def _dataset_labels(ds: Any) -> np.ndarray:
    for attr in ("targets", "labels", "_labels"):
        lab = getattr(ds, attr, None)
        if lab is not None:
            return np.asarray(lab)
    return np.asarray([ds[i][1] for i in range(len(ds))])


@register("torchvision")
def _torchvision(spec: DataSpec) -> Source:
    return TorchvisionSource(str(spec.name), Path(str(spec.path)), spec.download)


class TarSource(Source):
    """WebDataset-style tar shards: ``<key>.<jpg|png|...>`` + ``<key>.<cls|label|txt>`` members.

    ``path`` is a tar file, a folder of them, a glob, a brace range (``data-{000..009}.tar``),
    or an fsspec URL of any of those (``s3://bucket/data-{000..009}.tar``). Planning streams
    each tar once to index its members; an extraction task then reads only its samples' bytes
    (ranged reads). Tar names containing ``train``/``val``/``test`` give the splits.
    """

    def __init__(self, pattern: str) -> None:
        import tarfile

        self.urls = _expand_tars(pattern)
        self.members: list[tuple[int, str, int, int]] = []  # (tar, name, offset, size)
        raw_labels: list[str] = []
        splits: list[str] = []
        for t, url in enumerate(self.urls):
            groups: dict[str, dict[str, Any]] = {}
            try:
                with _open_binary(url) as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        base = m.name.rsplit("/", 1)[-1]
                        key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                        ext = base.split(".", 1)[1].lower() if "." in base else ""
                        g = groups.setdefault(key, {})
                        if "." + ext in IMAGE_EXTENSIONS:
                            g["image"] = (m.name, m.offset_data, m.size)
                        elif ext in ("cls", "label", "txt"):
                            f = tf.extractfile(m)
                            g["label"] = f.read().decode().strip() if f else ""
            except (tarfile.TarError, OSError) as exc:
                raise DataError(f"tar shard {url!r} is unreadable ({exc}); fix: check the file "
                                "is a complete tar archive") from None
            split = next((s for s in SPLIT_DIRS if s in url.rsplit("/", 1)[-1]), "")
            for _key, g in sorted(groups.items()):
                if "image" in g and g.get("label"):
                    self.members.append((t, *g["image"]))
                    raw_labels.append(g["label"])
                    splits.append(split)
        if not self.members:
            raise DataError(f"no image+label samples in {pattern!r}; fix: store each sample as "
                            "<key>.jpg (or .png) with <key>.cls holding its label")
        names = set(raw_labels)
        numeric = all(c.isdigit() for c in names)
        self.class_names = sorted(names, key=int) if numeric else sorted(names)
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels = np.asarray([index[c] for c in raw_labels], dtype=np.int64)
        self._splits = np.asarray(splits)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for url in self.urls:
            digest.update(f"{url}\0{_url_stamp(url)}\n".encode())
        return "webdataset:" + digest.hexdigest()

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        found = {s: np.flatnonzero(self._splits == s) for s in SPLIT_DIRS}
        found = {s: v for s, v in found.items() if len(v)}
        return found if "train" in found else None

    def sample_id(self, index: int) -> str:
        t, name, _o, _s = self.members[index]
        return f"{self.urls[t].rsplit('/', 1)[-1]}:{name}"

    def load(self, indices: Sequence[int]) -> Loaded:
        import io

        out = Loaded([], [], [])
        by_tar: dict[int, list[int]] = {}
        for i in indices:
            by_tar.setdefault(self.members[i][0], []).append(int(i))
        for t, idx in sorted(by_tar.items()):
            with _open_binary(self.urls[t]) as fh:
                for i in sorted(idx, key=lambda j: self.members[j][2]):
                    _t, _name, offset, size = self.members[i]
                    try:
                        fh.seek(offset)
                        out.images.append(decode_image(io.BytesIO(fh.read(size))))
                        out.indices.append(i)
                    except Exception as exc:
                        out.failures.append((i, f"{exc.__class__.__name__}: {exc}"[:300]))
        order = {i: n for n, i in enumerate(indices)}  # back to the requested order
        pairs = sorted(zip(out.indices, out.images, strict=True), key=lambda p: order[p[0]])
        out.indices = [p[0] for p in pairs]
        out.images = [p[1] for p in pairs]
        return out


def _expand_tars(pattern: str) -> list[str]:
    import glob
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        urls = [pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]
                for i in range(lo, hi + 1)]
    elif "://" in pattern:
        import fsspec

        _fs, _, paths = fsspec.get_fs_token_paths(pattern)
        proto = pattern.split("://", 1)[0]
        urls = sorted(f"{proto}://{p}" for p in paths)
    elif Path(pattern).is_dir():
        urls = sorted(str(p) for p in Path(pattern).glob("*.tar"))
    else:
        urls = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
    if not urls:
        raise DataError(f"no tar shards match {pattern!r}; fix: give a .tar file, a folder of "
                        "them, a glob or a range such as data-{000..009}.tar")
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise DataError(f"tar shard {missing[0]!r} does not exist ({len(missing)} missing); fix: "
                        "check the range in data.path")
    return urls


def _open_binary(url: str) -> Any:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _url_stamp(url: str) -> str:
    if "://" in url:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        return f"{info.get('size')}\0{info.get('ETag') or info.get('mtime') or ''}"
    st = os.stat(url)
    return f"{st.st_size}\0{st.st_mtime_ns}"


@register("webdataset")
def _webdataset(spec: DataSpec) -> Source:
    return TarSource(str(spec.path))
