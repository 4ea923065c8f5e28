"""A torchvision dataset by class name, all of its splits: ``download`` where there is internet,
else a root folder already in the dataset's own layout."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.sources import Loaded, Source, digest_of, failure, register
from pipeline.sources.decode import to_rgb_uint8
from pipeline.spec import DataSpec


class TorchvisionSource(Source):
    def __init__(self, name: str, root: Path, download: bool) -> None:
        from torchvision import datasets

        cls: Any = getattr(datasets, name, None)
        if not inspect.isclass(cls):
            raise DataError(f"unknown torchvision dataset {name!r}; fix: use a class name from "
                            "torchvision.datasets, e.g. CIFAR10, CIFAR100, STL10, Flowers102")
        make: Any = cls  # a dataset class of unknown signature
        params = inspect.signature(make.__init__).parameters
        parts: dict[str, Any] = {}
        errors = []
        if "train" in params:
            options: dict[str, dict[str, Any]] = {"train": {"train": True},
                                                  "test": {"train": False}}
        else:
            options = {"train": {"split": "train"}, "trainval": {"split": "trainval"},
                       "val": {"split": "val"}, "test": {"split": "test"}}
        for split, kw in options.items():
            try:
                parts["train" if split == "trainval" else split] = make(
                    root=str(root), download=download, **kw)
            except (RuntimeError, ValueError, OSError, TypeError) as exc:
                errors.append(f"{split}: {str(exc).splitlines()[0][:120] if str(exc) else exc}")
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


    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        return {s: np.flatnonzero(self._splits == s) for s, _ in self.parts}

    def raw(self, index: int) -> bytes:
        arr = np.ascontiguousarray(self.pixels(index))
        return f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()

    def pixels(self, i: int) -> Any:
        part = int(np.searchsorted(self._offsets, i, side="right")) - 1
        ds = self.parts[part][1]
        j = int(i - self._offsets[part])
        data: Any = getattr(ds, "data", None)
        if isinstance(data, np.ndarray) or hasattr(data, "numpy"):
            arr = np.asarray(data[j])  # MNIST/CIFAR keep decoded arrays: no PIL round trip
            return arr.transpose(1, 2, 0) if arr.ndim == 3 and arr.shape[0] == 3 else arr
        return np.asarray(ds[j][0].convert("RGB"))

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        out = Loaded()
        for i in indices:
            try:
                pixels = np.ascontiguousarray(self.pixels(int(i)))
                out.images.append(to_rgb_uint8(pixels))
                out.indices.append(int(i))
                out.digests.append(digest_of(f"{pixels.dtype}{pixels.shape}".encode()
                                             + pixels.tobytes()))
            except Exception as exc:
                out.failures.append(failure(i, exc))
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
