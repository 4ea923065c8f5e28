"""In-memory image arrays: sklearn's bundled ``digits``, ``.npz`` and HDF5 files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import Loaded, Source, digest_of, failure, register
from pipeline.sources.decode import to_rgb_uint8
from pipeline.spec import DataSpec

MAX_CLASSES = 100_000  # labels are class indices 0..K-1; a label of 10**18 is a mistake


class ArraySource(Source):
    """Image arrays with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
        self.images = images
        self.labels = labels
        self.class_names = class_names

    def raw(self, index: int) -> bytes:
        row = np.ascontiguousarray(self.images[index])
        return f"{row.dtype}{row.shape}".encode() + row.tobytes()

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        out = Loaded()
        for i in indices:
            try:
                out.images.append(to_rgb_uint8(self.images[i]))
                out.indices.append(int(i))
                out.digests.append(digest_of(self.raw(int(i))))
            except ValueError as exc:
                out.failures.append(failure(i, exc))
        return out


@register("digits")
def _digits(spec: DataSpec) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 8x8 grey values 0..16 -> uint8 0..255; upsampled later like any small image.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    return ArraySource(images, labels, [str(c) for c in d.target_names])


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
        raise DataError(f"{str(path)!r} is not a readable .npz file ({type(exc).__name__}); "
                        "fix: save it with numpy.savez(path, images=..., labels=...)") from None
    return array_source(path, arrays, "npz", "numpy.savez(path, images=..., labels=...)")


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
    except (OSError, TypeError, ValueError) as exc:
        raise DataError(f"{str(path)!r} is not a readable HDF5 file ({type(exc).__name__}); "
                        "fix: write it with h5py (datasets 'images' and 'labels')") from None
    if "class_names" in arrays:
        arrays["class_names"] = np.asarray([c.decode(errors="replace") if isinstance(c, bytes)
                                            else str(c) for c in np.ravel(arrays["class_names"])])
    return array_source(path, arrays, "hdf5", "h5py datasets 'images' and 'labels'")


def array_source(path: Path, arrays: dict[str, np.ndarray], kind: str, how: str) -> Source:
    """Check the arrays of a file and wrap them as a source.

    Raises:
        DataError: a missing array, mismatched lengths, labels that are not class indices,
            images of an unusable shape or with NaN/inf.
    """
    how = f"store {how}"
    where = repr(str(path))
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise DataError(f"{where} lacks array(s) {missing} (has {sorted(arrays)}); fix: {how}")
    images, labels = np.asarray(arrays["images"]), np.asarray(arrays["labels"])
    if labels.ndim != 1:
        raise DataError(f"{where} labels have shape {labels.shape}; fix: store one integer "
                        "class index per image (a 1-D array)")
    if images.ndim == 0 or len(images) != len(labels):
        raise DataError(f"{where} has {len(images) if images.ndim else 0} images but "
                        f"{len(labels)} labels; fix: give exactly one label per image")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where} labels have dtype {labels.dtype}, not integers; fix: store "
                        "class indices 0..K-1 (and class names in 'class_names')")
    if images.dtype.kind not in "iufb":
        raise DataError(f"{where} images have dtype {images.dtype}; fix: store uint8 pixels "
                        "(or floats in 0..1)")
    if images.ndim not in (3, 4) or 0 in images.shape[1:]:
        raise DataError(f"{where} images have shape {images.shape}; fix: use N x H x W "
                        "(grey), N x H x W x C (uint8 HWC) or N x C x H x W (float CHW)")
    if images.ndim == 4 and images.shape[3] not in (1, 3, 4) and images.shape[1] not in (1, 3):
        raise DataError(f"{where} images have shape {images.shape}: neither HWC nor CHW with 1, "
                        "3 or 4 channels; fix: store N x H x W x 3 (or N x 3 x H x W)")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = int(np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(1))[0])
        raise DataError(f"{where} images hold NaN/inf (first at sample {bad}); fix: clean or "
                        "drop those samples")
    if images.size and images.dtype.kind in "iuf" and images.dtype != np.uint16:
        lo, hi = float(images.min()), float(images.max())
        top = 1.0 if images.dtype.kind == "f" and hi <= 1.0 else 255.0
        if lo < 0 or hi > 255:  # never clipped to black or white without a word
            raise DataError(f"{where} images hold values {lo:g}..{hi:g} (dtype "
                            f"{images.dtype}), outside 0..{top:g}; fix: scale them to uint8 "
                            "0..255 (or floats in 0..1; uint16 is read as 0..65535)")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{where} has negative label {int(labels.min())}; fix: use class "
                        "indices 0..K-1")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if n_classes > MAX_CLASSES:
        raise DataError(f"{where} has label {int(labels.max())}: labels must be class indices "
                        f"0..K-1 with K <= {MAX_CLASSES}; fix: map the labels to 0..K-1")
    if "class_names" in arrays:
        names = [str(c) for c in np.ravel(arrays["class_names"])]
        if len(names) < n_classes:
            raise DataError(f"{where} has {len(names)} class names but labels up to "
                            f"{n_classes - 1}; fix: give one name per class index")
    else:
        names = [str(i) for i in range(n_classes)]
    used = np.unique(labels)
    if len(used) < n_classes and "class_names" not in arrays:
        unused = n_classes - len(used)
        if unused > len(used):  # [0, 1000] would silently make 1001 classes
            raise DataError(f"{where} labels use {len(used)} distinct values but go up to "
                            f"{n_classes - 1} ({unused} classes would have no sample); fix: "
                            "map the labels to 0..K-1, or store 'class_names'")
    return ArraySource(images, labels.astype(np.int64), names)
