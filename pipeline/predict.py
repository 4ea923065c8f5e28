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
        """``image``, ``text`` or ``audio``: what ``predict`` takes (image paths/arrays,
        strings, or audio paths / ``(samples, rate)`` pairs)."""
        return self.preprocessing.modality

    def _input(self, sample: Any) -> Any:
        if self.modality == "text":
            return _as_text(sample)
        if self.modality == "audio":
            return _as_clip(sample)
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


def _as_clip(sample: Any) -> Any:
    """An audio file's path (or bytes), a ``(samples, rate)`` pair or a ``Clip`` -> a Clip."""
    from pipeline.sources.audio import Clip, decode_audio

    if isinstance(sample, Clip):
        return sample
    if isinstance(sample, tuple) and len(sample) == 2:
        x, rate = np.asarray(sample[0], np.float32), int(sample[1])
        if x.ndim == 2:
            x = x.mean(axis=1 if x.shape[1] <= 64 else 0)
        if x.ndim != 1 or not len(x) or not np.isfinite(x).all():
            raise FeaturefleetError(f"samples of shape {x.shape} are not a finite mono or "
                                    "multi-channel clip; fix: pass (samples, rate) pairs")
        return Clip(np.ascontiguousarray(x), rate)
    try:
        raw = sample if isinstance(sample, bytes) else Path(sample).read_bytes()
        return decode_audio(raw)
    except (OSError, TypeError, ValueError) as exc:
        shown = "the bytes" if isinstance(sample, bytes) else repr(str(sample))
        raise FeaturefleetError(f"cannot read audio {shown} ({reason(exc)}); fix: pass a "
                                "readable audio file (wav, flac, ogg)") from None


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


class BatchWriter:
    """Predictions of many samples streamed to ``predictions.parquet`` and ``predictions.csv``
    (written under temporary names, published together by :meth:`close`), with the counts of
    the summary. Columns: ``sample_id``, ``index``, ``predicted``, ``probability``, then
    ``top_2`` / ``probability_2`` ... up to ``top``, ``given_label`` (the data's own label,
    when it has one) and ``error`` (why a sample has no prediction)."""

    def __init__(self, job_dir: Path, class_names: list[str], top: int,
                 low_confidence: float, given_names: list[str] | None = None) -> None:
        from pipeline.fsio import temp_name

        self.job_dir = job_dir
        self.class_names = class_names
        self.top = max(1, min(top, len(class_names)))
        self.low = low_confidence
        self.given_names = given_names
        self.paths = {ext: job_dir / f"predictions.{ext}" for ext in ("parquet", "csv")}
        self.tmp = {ext: temp_name(p) for ext, p in self.paths.items()}
        job_dir.mkdir(parents=True, exist_ok=True)
        self._parquet: Any = None
        self._csv = open(self.tmp["csv"], "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv_writer: Any = None
        self.counts = np.zeros(len(class_names), np.int64)
        self.low_count = 0
        self.rows = 0
        self.errors: list[dict[str, str]] = []
        self.agree = 0
        self.labelled = 0
        self.least_sure: list[tuple[float, str, str]] = []  # (probability, id, predicted)

    def columns(self) -> list[str]:
        cols = ["sample_id", "index", "predicted", "probability"]
        for k in range(2, self.top + 1):
            cols += [f"top_{k}", f"probability_{k}"]
        return [*cols, "given_label", "error"]

    def add(self, ids: Sequence[str], indices: np.ndarray, proba: np.ndarray,
            given: np.ndarray | None = None) -> None:
        """One block of predictions (rows of ``proba`` follow ``ids``)."""
        order = np.argsort(-proba, axis=1)[:, : self.top]
        best = proba[np.arange(len(proba)), order[:, 0]] if len(proba) else np.zeros(0)
        table: dict[str, list[Any]] = {c: [] for c in self.columns()}
        names = self.class_names
        for r, sid in enumerate(ids):
            table["sample_id"].append(str(sid))
            table["index"].append(int(indices[r]))
            table["predicted"].append(names[int(order[r, 0])])
            table["probability"].append(round(float(best[r]), 6))
            for k in range(2, self.top + 1):
                table[f"top_{k}"].append(names[int(order[r, k - 1])])
                table[f"probability_{k}"].append(round(float(proba[r, order[r, k - 1]]), 6))
            label = None
            if given is not None and self.given_names is not None and int(given[r]) >= 0:
                label = self.given_names[int(given[r])]
                self.labelled += 1
                self.agree += int(label == names[int(order[r, 0])])
            table["given_label"].append(label)
            table["error"].append(None)
        np.add.at(self.counts, order[:, 0], 1)
        unsure = best < self.low
        self.low_count += int(unsure.sum())
        for r in np.argsort(best)[:20]:  # the least confident seen so far, for the report
            self.least_sure.append((float(best[r]), str(ids[r]), names[int(order[r, 0])]))
        self.least_sure = sorted(self.least_sure)[:20]
        self._write(table)
        self.rows += len(ids)

    def add_errors(self, failures: Sequence[dict[str, str]]) -> None:
        """Samples that could not be read: a row each, with the reason and no prediction."""
        if not failures:
            return
        table: dict[str, list[Any]] = {c: [None] * len(failures) for c in self.columns()}
        table["sample_id"] = [str(f["id"]) for f in failures]
        table["index"] = [-1] * len(failures)
        table["error"] = [str(f["reason"]) for f in failures]
        self.errors.extend({"id": str(f["id"]), "reason": str(f["reason"])} for f in failures)
        self._write(table)

    def _write(self, table: dict[str, list[Any]]) -> None:
        import csv

        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.reports.cells import csv_cell

        schema = pa.schema([(c, pa.int64() if c == "index" else pa.float64()
                             if c.startswith("probability") else pa.string())
                            for c in self.columns()])
        batch = pa.Table.from_pydict(table, schema=schema)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(str(self.tmp["parquet"]), schema)
            self._csv_writer = csv.writer(self._csv)
            self._csv_writer.writerow(self.columns())
        self._parquet.write_table(batch)
        for row in zip(*(table[c] for c in self.columns()), strict=True):
            self._csv_writer.writerow(["" if v is None else csv_cell(v) if isinstance(v, str)
                                       else v for v in row])

    def close(self) -> dict[str, Any]:
        """Publish both files (atomic renames) and return the summary."""
        import os

        if self._parquet is None:
            self._write({c: [] for c in self.columns()})
        self._parquet.close()
        self._csv.close()
        for ext, path in self.paths.items():
            os.replace(self.tmp[ext], path)
        counts = {self.class_names[c]: int(n) for c, n in enumerate(self.counts) if n}
        return {
            "predicted": self.rows, "failed": len(self.errors), "errors": self.errors[:50],
            "class_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "low_confidence": {"threshold": self.low, "count": self.low_count,
                               "share": round(self.low_count / self.rows, 4) if self.rows
                               else None},
            "least_confident": [{"id": i, "predicted": p, "probability": round(q, 4)}
                                for q, i, p in self.least_sure[:10]],
            "given_labels": {"samples": self.labelled, "agree": self.agree,
                             "share": round(self.agree / self.labelled, 4)}
            if self.labelled else None,
            "files": {ext: str(p) for ext, p in self.paths.items()}}

    def abort(self) -> None:
        """Remove the temporary files (nothing is published)."""
        if self._parquet is not None:
            self._parquet.close()
        self._csv.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)
