"""Using a trained head: backbone + head on new images.

``load_classifier(path).predict(images)`` in Python, ``featurefleet predict MODEL IMAGES...`` on
the command line; a classifier trained on texts takes strings (``--text``, ``--text-file``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import (
    AnyPreprocessing,
    Preprocessing,
    preprocessing_from_dict,
    use_preprocessing,
)
from pipeline.devices import cached_backbone, pick_device
from pipeline.errors import FeaturefleetError
from pipeline.heads import load_head
from pipeline.preprocess import preprocess
from pipeline.sources.decode import decode_image, reason, to_rgb_uint8


@dataclass
class Classifier:
    """A frozen backbone plus a trained head, with the preprocessing they were trained with."""

    head: Any
    backbone: str
    weights: str | None
    preprocessing: AnyPreprocessing
    class_names: list[str]
    device: str = "cpu"
    batch_size: int = 32
    decode: str = "full"  # as the training features were decoded (``backbone.decode``)

    @property
    def _min_side(self) -> int | None:
        pre = self.preprocessing
        scaled = self.decode in ("scaled", "auto")
        return pre.resize if scaled and isinstance(pre, Preprocessing) else None

    @property
    def modality(self) -> str:
        """``image`` or ``text``: what ``predict`` takes (paths/arrays, or strings)."""
        return self.preprocessing.modality

    def _input(self, sample: Any) -> Any:
        if self.modality == "text":
            return _as_text(sample)
        return _as_rgb(sample, self._min_side)

    def _run(self, images: Sequence[Any], net: Any, width: int) -> np.ndarray:
        """``net`` over the images in batches (same preprocessing as training) -> rows."""
        import torch

        arrays = [self._input(im) for im in images]
        out = []
        with torch.inference_mode():
            for i in range(0, len(arrays), self.batch_size):
                batch = preprocess(arrays[i: i + self.batch_size], self.preprocessing,
                                           self.device)
                out.append(net(batch).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def features(self, images: Sequence[Any]) -> np.ndarray:
        bb = cached_backbone(self.backbone, self.weights, self.device)
        use_preprocessing(bb.model, self.preprocessing)
        return self._run(images, bb.model, bb.feature_dim)

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """Class probabilities, one row per image (columns follow ``class_names``)."""
        return np.asarray(self.head.predict_proba(self.features(images)))

    def predict(self, images: Sequence[Any], top: int = 3) -> list[dict[str, Any]]:
        """For each image, in order: the predicted ``label``, its ``probability`` and the
        ``top`` k; an image that cannot be read gets ``error`` (with the reason) instead, and
        the others are classified all the same."""
        arrays: list[tuple[int, np.ndarray]] = []
        results: list[dict[str, Any]] = [{} for _ in images]
        for n, image in enumerate(images):
            try:
                arrays.append((n, self._input(image)))
            except FeaturefleetError as exc:
                results[n] = {"label": None, "probability": None, "top": [], "error": str(exc)}
        proba = self.predict_proba([a for _, a in arrays]) if arrays else np.zeros((0, 0))
        for (n, _), row in zip(arrays, proba, strict=True):
            order = np.argsort(-row)[:top]
            results[n] = {"label": self.class_names[order[0]],
                          "probability": float(row[order[0]]),
                          "top": [{"label": self.class_names[j], "probability": float(row[j])}
                                  for j in order]}
        return results


@dataclass
class FinetunedClassifier(Classifier):
    """A fine-tuned network (``strategy: finetune``): backbone and head trained together."""

    net: Any = None

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        return self._run(images, lambda x: torch.softmax(self.net(x).float(), 1),
                         len(self.class_names))


def load_classifier(path: str | Path, device: str = "auto") -> Classifier:
    """Load a trained head (a ``head*.pt`` file or a job folder) with its backbone, or a
    fine-tuned network (a fine-tuning job's folder or its ``finetune/best.pt``).

    Example:
        >>> clf = load_classifier("runs/jobs/3f2a9c1b7d4e")       # doctest: +SKIP
        >>> clf.predict(["cat.jpg"])[0]["label"]                  # doctest: +SKIP

    Raises:
        FeaturefleetError: the path holds no head.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "head.pt" if (p / "head.pt").is_file() else p / "finetune" / "best.pt"
    if p.is_file() and p.parent.name == "finetune":
        from pipeline.finetune import load_network

        dev = pick_device(device)
        net, meta = load_network(p, dev)
        return FinetunedClassifier(head=None, backbone=meta["backbone"],
                                   weights=meta.get("weights"),
                                   preprocessing=preprocessing_from_dict(meta["preprocessing"]),
                                   class_names=list(meta["class_names"]), device=dev, net=net)
    if not p.is_file():
        raise FeaturefleetError(f"no trained head at {str(path)!r}; fix: pass a job folder "
                                "(<output>/jobs/<id>) or its head.pt file")
    head = load_head(p)
    meta = head.meta
    pre = meta["preprocessing"]
    return Classifier(
        head=head, backbone=meta["backbone"], weights=meta.get("weights"),
        preprocessing=preprocessing_from_dict(pre),
        class_names=list(meta["class_names"]), device=pick_device(device),
        decode=str(meta.get("decode", "full")))


def _as_text(text: Any) -> str:
    if isinstance(text, bytes):
        from pipeline.sources.decode import decode_text

        try:
            return decode_text(text)
        except ValueError as exc:
            raise FeaturefleetError(f"cannot use {text[:40]!r} as text ({exc}); fix: pass "
                                    "UTF-8 text") from None
    if not isinstance(text, str):
        raise FeaturefleetError(f"this classifier reads texts, got a {type(text).__name__}; "
                                "fix: pass strings (featurefleet predict MODEL --text ...)")
    if not text.strip():
        raise FeaturefleetError("cannot classify an empty text; fix: pass some words")
    return text.strip()


def _as_rgb(image: Any, min_side: int | None = None) -> np.ndarray:
    if isinstance(image, (str, Path)):
        try:
            return decode_image(image, min_side)
        except Exception as exc:
            raise FeaturefleetError(f"cannot read image {str(image)!r} ({reason(exc)}); fix: "
                                    "pass a readable image file") from None
    if hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    return to_rgb_uint8(np.asarray(image))
