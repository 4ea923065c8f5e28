"""Spec -> plan: open the data, resolve the backbone, split once, decide everything else
(``exclusions``: what is left out before splitting; ``models``: the classifier a
prediction job applies).

:func:`make_plan` runs in the client at submission, so a bad spec, unreadable data or an
unknown backbone fails before anything is enqueued.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import backbones, splits
from pipeline.errors import BackboneError, DataError, SpecError, StoreError
from pipeline.heads.linear import l2_grid
from pipeline.plan import (
    JOB_ID,
    BackboneInfo,
    Plan,
    QualityPlan,
    Shard,
    Splits,
)
from pipeline.planner.exclusions import find_exclusions, reviewed_exclusions
from pipeline.planner.models import resolve_model
from pipeline.planner.pretraining import pretrain_checks, pretrain_recipe
from pipeline.sources import Source, digests, open_source
from pipeline.spec import DataSpec, JobSpec
from pipeline.store import files, manifest
from pipeline.store.shards import SCHEMA_VERSION, shard_name
from pipeline.strategy import choose


def content_key(spec: JobSpec, fingerprint: str, weights: backbones.WeightsInfo,
                pre: backbones.AnyPreprocessing, extract_ids: list[int]) -> str:
    """Hash of everything that determines the stored features (not the split: the same
    features serve any split of the same samples)."""
    parts = {
        "schema": SCHEMA_VERSION,
        "data": fingerprint,
        "samples": hashlib.sha256(np.asarray(extract_ids, np.int64).tobytes()).hexdigest(),
        "shard_size": spec.data.shard_size,
        "backbone": spec.backbone.name,
        "weights_sha256": weights.sha256,
        "preprocessing": pre.to_dict(),
        "layer": "penultimate-pooled",
        "dtype": spec.backbone.feature_dtype,
        "precision": spec.backbone.precision,  # CUDA autocast changes the features
        "decode": spec.backbone.decode,  # DCT-scaled JPEG decoding changes the pixels
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def data_fingerprint(source: Source, digest: np.ndarray, mode: str) -> str:
    """What identifies the data: every sample's digest, label and id, and the class names."""
    h = hashlib.sha256(f"{source.kind}\0{mode}\0".encode())
    h.update(np.ascontiguousarray(digest).tobytes())
    h.update(np.asarray(source.labels, np.int64).tobytes())
    h.update(json.dumps([source.class_names,
                         [source.sample_id(i) for i in range(len(source))]]).encode())
    return f"{source.kind}:{mode}:{h.hexdigest()}"


def unseen_classes(source: Source, split: dict[str, np.ndarray], data: DataSpec) -> list[str]:
    """Classes of val/test with no training sample: an error, or (allowed) a warning.

    Raises:
        DataError: a val or test class never seen in training.
    """
    seen = set(source.labels[split["train"]].tolist())
    found = []
    for name in ("val", "test"):
        missing = sorted(set(source.labels[split[name]].tolist()) - seen)
        if missing:
            labels = [source.class_names[c] for c in missing]
            found.append(f"{len(missing)} class(es) of the {name} split have no training "
                         f"sample: {labels[:10]} (they can never be predicted right)")
    if found and not data.allow_unseen_test_classes:
        raise DataError(f"{found[0]}; fix: add training samples of those classes, drop them "
                        "from the evaluation data, or set data.allow_unseen_test_classes: true")
    return found


def fit_tfidf(source: Source, train: np.ndarray, spec: JobSpec) -> Path:
    """The ``tfidf`` baseline's vocabulary, fitted on the training split's texts only (under
    ``<output>/tfidf``, named by its sha256: the same split and texts give the same file)."""
    from pipeline.backbones import tfidf

    texts = [t for t in source.load([int(i) for i in train]).images if isinstance(t, str)]
    return tfidf.fit(texts, Path(spec.output).expanduser().resolve() / "tfidf")


def resolve_backbone(spec: JobSpec) -> tuple[str, str | None, backbones.WeightsInfo]:
    """(architecture, weights, identity) of ``backbone``: a registered name, or ``job:<id>``,
    the encoder of a finished pretraining job (under the same ``output``; its input size is
    the default).

    Raises:
        BackboneError: unknown names or weights, or a job that is not a finished pretraining.
    """
    name = spec.backbone.name
    if not name.startswith("job:"):
        return name, spec.backbone.weights, backbones.resolve_weights(name,
                                                                      spec.backbone.weights)
    job_id = name[4:]
    job_dir = Path(spec.output).expanduser().resolve() / "jobs" / job_id
    if not JOB_ID.match(job_id) or not (job_dir / "plan.json").is_file():
        raise BackboneError(f"backbone {name!r}: no job {job_id!r} under {str(job_dir.parent)!r}"
                            "; fix: use the id featurefleet pretrain printed, with the same "
                            "output folder, or backbone.weights: /path/to/encoder.pt")
    report = job_dir / "report.json"
    if not report.is_file():
        raise BackboneError(f"backbone {name!r}: pretraining job {job_id} has not finished; "
                            f"fix: wait for it (featurefleet watch {job_id})")
    try:
        rep = json.loads(report.read_bytes())
    except (OSError, ValueError):
        rep = None
    if not isinstance(rep, dict):
        raise BackboneError(f"backbone {name!r}: {str(report)!r} is not a readable report "
                            f"(broken JSON); fix: run the pretraining job again, or name its "
                            "encoder file with backbone.weights: /path/to/encoder.pt")
    if rep.get("kind") != "pretrain" or not rep.get("encoder"):
        raise BackboneError(f"backbone {name!r}: job {job_id} is not a pretraining job; fix: "
                            "name a job submitted with kind: pretrain")
    encoder = str(rep["encoder"])
    if not Path(encoder).is_file() or backbones.file_sha256(encoder) != rep["encoder_sha256"]:
        raise BackboneError(f"backbone {name!r}: the encoder {encoder!r} is missing or changed "
                            "since its job wrote it; fix: run the pretraining job again")
    try:
        arch = str(rep["backbone"]["arch"])
        pre = backbones.Preprocessing.from_dict(rep["backbone"]["preprocessing"])
    except (KeyError, TypeError, ValueError):
        raise BackboneError(f"backbone {name!r}: {str(report)!r} lacks the encoder's "
                            "architecture or preprocessing; fix: run the pretraining job "
                            "again") from None
    return arch, encoder, backbones.WeightsInfo(name, rep["encoder_sha256"], pre)


def finetune_checks(spec: JobSpec, n_train: int) -> None:
    """Fine-tuning can train: one global batch fits the training split, with at least two
    samples for every node (BatchNorm in train mode needs two).

    Raises:
        DataError: the batch is larger than the training split, or too small for the nodes.
    """
    ft = spec.finetune
    if n_train < ft.batch_size:
        raise DataError(f"{n_train} training samples are fewer than one batch "
                        f"(finetune.batch_size {ft.batch_size}); fix: lower finetune.batch_size "
                        f"to at most {max(2, n_train)}, or add data")
    if ft.batch_size // ft.nodes < 2:
        raise DataError(f"finetune.batch_size {ft.batch_size} leaves fewer than 2 samples for "
                        f"each of finetune.nodes {ft.nodes}; fix: raise finetune.batch_size to "
                        f"at least {2 * ft.nodes}, or lower finetune.nodes")


def modality_checks(source: Source, spec: JobSpec,
                    pre: backbones.AnyPreprocessing) -> backbones.AnyPreprocessing:
    """The backbone reads the data's modality; the input size the spec asks for.

    Raises:
        SpecError: images with a text backbone or texts with an image one; a size option of
            the other modality; pretraining on texts.
    """
    b = spec.backbone
    if source.modality != pre.modality:
        fix = {"text": "backbone.name: all-minilm-l6-v2 (or hf:<encoder folder>)",
               "audio": "backbone.name: resemblyzer (or mfcc, the handcrafted baseline)"}.get(
            source.modality, "an image backbone such as efficientnet_lite0")
        raise SpecError("backbone.name", f"the data is {source.modality} but backbone "
                        f"{b.name!r} reads {pre.modality}", f"use {fix}")
    if isinstance(pre, backbones.AudioPreprocessing):
        for name, value in (("image_size", b.image_size), ("max_length", b.max_length)):
            if value is not None:
                raise SpecError(f"backbone.{name}", f"{name} is not for audio; the clips are "
                                f"resampled to {pre.sample_rate} Hz and cut into the encoder's "
                                "windows", f"remove backbone.{name}")
        if spec.kind == "pretrain":
            raise SpecError("kind", "pretraining runs on images; this job's data is audio "
                            "(no audio augmentations yet)", "use a pretrained audio encoder "
                            "(backbone.name: resemblyzer) with kind: classify")
        return pre
    if isinstance(pre, backbones.TextPreprocessing):
        if b.image_size is not None:
            raise SpecError("backbone.image_size", "image_size is for images; this job's data "
                            "is text", "set backbone.max_length (tokens) instead")
        if spec.kind == "pretrain":
            raise SpecError("kind", "pretraining runs on images; this job's data is text",
                            "fine-tune the text encoder with labels (strategy: finetune)")
        return pre.scaled_to(b.max_length)
    if b.max_length is not None:
        raise SpecError("backbone.max_length", "max_length is for text backbones; this job's "
                        "data is images", "set backbone.image_size instead")
    return pre.scaled_to(b.image_size)


def dropped_rows(source: Source) -> list[str]:
    """A warning for rows a source left out before planning (texts without a label)."""
    dropped: list[tuple[str, str]] = getattr(source, "dropped", [])
    if not dropped:
        return []
    shown = ", ".join(f"{i} ({why})" for i, why in dropped[:5])
    return [f"{len(dropped)} row(s) left out before planning, e.g. {shown}"]


TRANSFORMER_LR = 1e-4  # above this an encoder's fine-tuning usually forgets its pretraining


def text_finetune_lr(spec: JobSpec, pre: backbones.AnyPreprocessing) -> list[str]:
    """A warning when a text encoder would be fine-tuned at an image-style learning rate."""
    ft = spec.finetune
    lr = ft.lr * ft.backbone_lr_mult
    if pre.modality != "text" or spec.strategy == "probe" or lr <= TRANSFORMER_LR:
        return []
    return [f"fine-tuning the text encoder at learning rate {lr:g} (finetune.lr x "
            f"backbone_lr_mult); transformers are usually fine-tuned at 2e-5..1e-4: set e.g. "
            f"finetune.backbone_lr_mult: {2e-5 / ft.lr:.3g}"]


QUALITY_L2 = 1e-3  # the probe's penalty in the quality stage when probe.l2 is not fixed
QUALITY_SCHEMA = 7  # bump when the stage's result changes: older results are not reused


def quality_plan(spec: JobSpec, rows: int, features_key: str = "",
                 split: dict[str, Any] | None = None, shard_dir: str = "") -> QualityPlan:
    """The quality stage's fan-out over ``rows`` extracted samples, and its content address:
    an earlier job's result for the same features, split and settings is reused."""
    q = spec.quality
    size = q.block_rows
    l2 = spec.probe.l2 if spec.probe.l2 is not None else QUALITY_L2
    parts = {"schema": QUALITY_SCHEMA, "features": features_key, "l2": l2,
             "split": {k: sorted(int(i) for i in v) for k, v in (split or {}).items()},
             "quality": q.model_dump(mode="json", exclude={"enabled", "exclude", "exclude_file"})}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    path = files.join(shard_dir, "quality", f"{key[:24]}.json") if shard_dir else ""
    cached = bool(path) and _readable_json(path)
    return QualityPlan(blocks=[(s, min(rows, s + size)) for s in range(0, rows, size)],
                       folds=q.folds, fractions=sorted(set(q.curve_fractions)), l2=l2,
                       key=key, cache_path=path, cached=cached)


def _readable_json(path: str) -> bool:
    try:
        text = files.read_text(path)
        return text is not None and isinstance(json.loads(text), dict)
    except (ValueError, OSError, StoreError):
        return False


def sweep_slices(spec: JobSpec) -> list[list[float]] | None:
    """The λ grid (strongest first) cut into one contiguous slice per sweep task, or None when
    ``probe.l2`` is fixed."""
    p = spec.probe
    if p.l2 is not None:
        return None
    grid = l2_grid(p.grid_points, p.grid_low, p.grid_high)
    n = min(p.sweep_tasks, len(grid))
    return [[float(v) for v in chunk] for chunk in np.array_split(np.asarray(grid), n)
            if len(chunk)]


def make_plan(spec: JobSpec, job_id: str, gpus: int | Callable[[], int] = 0,
              source: Source | None = None) -> Plan:
    """Resolve a validated spec into a plan (opens the data source and the weights metadata).

    ``gpus``: GPU workers online (or a function that asks the fleet, called only for
    ``strategy: auto``, after the data and backbone checks). A fine-tuning plan has no shards:
    it trains on the samples, not on cached features.

    Raises:
        DataError, BackboneError, StoreError: the data, backbone or store cannot be used.
    """
    spec = spec.resolved()
    predict = None
    if spec.kind == "predict":
        spec, predict = resolve_model(spec)
    source = source or open_source(spec.data)
    unlabeled_because = getattr(source, "unlabeled_because", None)
    if unlabeled_because is not None and predict is None and spec.kind not in (
            "embed", "recommend"):  # a table without its labels, where labels are needed
        raise unlabeled_because
    mode = spec.data.fingerprint
    digest = digests(source, range(len(source)), mode)
    # prediction answers for every sample, copies included
    every = predict is not None or spec.kind in ("embed", "recommend")  # copies too
    excluded = find_exclusions(source, digest, spec.data) if mode == "content" and \
        not every else []
    reviewed, review_warnings = reviewed_exclusions(
        source, spec.quality.exclude_file if predict is None else None, excluded)
    excluded = sorted(excluded + reviewed, key=lambda e: e.index)
    pretraining = spec.kind == "pretrain"
    labeled = len(np.unique(source.labels)) >= 2
    if every or (spec.kind != "classify" and not labeled):
        # unlabeled (or predicted): every sample is "train"
        keep = np.setdiff1d(np.arange(len(source)), [e.index for e in excluded])
        if spec.data.limit is not None and spec.data.limit < len(keep):  # a seeded subset
            rng = np.random.default_rng(spec.data.seed)
            keep = np.sort(rng.permutation(keep)[:spec.data.limit])
        split = {"train": keep, "val": np.zeros(0, np.int64), "test": np.zeros(0, np.int64)}
    else:
        split = splits.compute_splits(
            source.labels, source.predefined_splits(), seed=spec.data.seed,
            test_fraction=spec.data.test_fraction, val_fraction=spec.probe.val_fraction,
            limit=spec.data.limit, exclude=[e.index for e in excluded])
    warnings = unseen_classes(source, split, spec.data) if labeled and not every else []
    if spec.backbone.name == "tfidf" and source.modality == "text":
        spec = spec.replace(backbone={"weights": str(fit_tfidf(source, split["train"], spec))})
    arch, arch_weights, weights = resolve_backbone(spec)
    if spec.backbone.feature_dtype == "auto":  # an untrained network's activations can
        # vanish below float16's range (random EfficientNet-Lite0's are ~1e-10): float32
        spec = spec.replace(backbone={"feature_dtype": "float32" if weights.id == backbones.RANDOM
                                      else "float16"})
    pre = modality_checks(source, spec, weights.preprocessing)
    if backbones.is_baseline(weights.id) and (pretraining or spec.strategy == "finetune"):
        raise SpecError("backbone.name", f"{spec.backbone.name!r} is a handcrafted baseline "
                        "with nothing to train", "use it with strategy: probe (or auto), and "
                        "fine-tune or pretrain a network backbone")
    warnings += review_warnings + dropped_rows(source) + text_finetune_lr(spec, pre)
    if pretraining:
        pretrain_checks(source, spec, pre.input_size, len(split["train"]) + len(split["val"]))
    fingerprint = data_fingerprint(source, digest, mode)
    if spec.strategy == "auto" and callable(gpus) and spec.kind == "classify":
        gpus = gpus()
    if predict is not None:
        strategy, reason = "probe", (f"batch prediction: the {predict.head} head of job "
                                     f"{predict.model_job} on every sample's features")
    elif spec.kind == "embed":
        strategy, reason = "probe", ("embeddings: every sample's features, exported with a "
                                     "nearest-neighbour index")
    elif spec.kind == "recommend":
        from pipeline.planner.interactions import prepare

        got = prepare(source, spec, Path(spec.output) / "jobs" / job_id)
        strategy, reason = "probe", (
            f"recommendation: every item's content features ({len(source)} items), then "
            f"popularity, collaborative filtering and content models on {got['train']:,} "
            f"training interactions of {got['users']:,} users; evaluated on {got['warm_test']:,}"
            f" warm and {got['cold_test']:,} cold-item interactions ({got['split']} split)")
    elif pretraining:
        spec, reason = pretrain_recipe(spec, weights.id,
                                       len(split["train"]) + len(split["val"]))
        strategy = "probe"
    elif spec.kind != "classify":
        strategy, reason = "probe", "data quality: the stage runs on the cached features"
    elif backbones.is_baseline(weights.id):
        strategy, reason = "probe", ("probe: a handcrafted baseline has nothing to "
                                     "fine-tune")
    elif pre.modality == "audio" and spec.strategy == "auto":
        strategy, reason = "probe", ("probe: an audio encoder is fine-tuned only when asked "
                                     "(strategy: finetune); a head on its frozen features "
                                     "is the usual first step")
    else:
        strategy, reason = choose(spec, len(split["train"]), len(source.class_names),
                                  pre.input_size, gpus if isinstance(gpus, int) else 0,
                                  "tokens" if pre.modality == "text" else "px")
    if strategy == "finetune":
        finetune_checks(spec, len(split["train"]))
    extract_ids = sorted({int(i) for v in split.values() for i in v})
    key = content_key(spec, fingerprint, weights, pre, extract_ids)
    shard_dir = files.join(spec.store_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", arch).strip("_."),
                           key[:20])
    shards: list[Shard] = []
    quality = quality_plan(spec, len(extract_ids), key, split, shard_dir) if (
        spec.kind == "quality" or (spec.kind == "classify" and strategy == "probe"
                                   and spec.quality.enabled)) else None
    if strategy == "probe" and not pretraining:
        known = manifest.read_manifest(shard_dir)
        size = spec.data.shard_size
        for start in range(0, len(extract_ids), size):
            end = min(len(extract_ids), start + size)
            path = files.join(shard_dir, shard_name(start, end))
            cached = manifest.trusted(path, key, end - start, known)
            shards.append(Shard(start=start, end=end, path=path, cached=cached))
    return Plan(
        job_id=job_id, kind=spec.kind, created=time.time(), spec=spec, strategy=strategy,
        strategy_reason=reason, fingerprint=fingerprint, fingerprint_mode=mode,
        class_names=source.class_names, n_samples=len(source), excluded=excluded,
        warnings=warnings,
        splits=Splits(**{k: [int(i) for i in v] for k, v in split.items()}),
        backbone=BackboneInfo(
            name=arch, weights=arch_weights, weights_id=weights.id,
            weights_sha256=weights.sha256, preprocessing=pre.to_dict(),
            feature_dtype=spec.backbone.feature_dtype, precision=spec.backbone.precision),
        key=key, shard_dir=shard_dir, shards=shards,
        sweep=sweep_slices(spec) if spec.kind == "classify" else None, l2=spec.probe.l2,
        quality=quality, predict=predict).with_digests(digest)
