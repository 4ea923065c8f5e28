"""The job spec: one typed, frozen description of a job, validated once at the boundary.

The Python API, the CLI and YAML/JSON files all map onto :class:`JobSpec`. A spec that
validates here is never rejected later for a field's shape; a spec that does not validate
raises :class:`~pipeline.errors.SpecError` naming the field and the fix, before anything is
enqueued.

Example YAML::

    name: digits-lite0
    data: {source: digits, test_fraction: 0.3, seed: 0, shard_size: 512}
    backbone: {name: efficientnet_lite0, batch_size: 32}
    probe: {l2: 0.001}
    output: ./featurefleet-out
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.errors import SpecError

DATA_SOURCES = ("digits", "imagefolder", "manifest", "npz", "hdf5", "torchvision", "webdataset")
STRATEGIES = ("probe", "finetune", "auto")
OPTIMIZERS = ("adamw", "sgd")
FEATURE_DTYPES = ("float16", "float32")
PRECISIONS = ("bf16", "fp16", "fp32")
AUTO_BATCH = {"cuda": 512, "cpu": 32}  # batch_size: auto starts here (halved on out-of-memory)
HEADS = ("linear", "mlp", "knn")


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from and how they are split and sharded."""

    source: str = "digits"  # digits|imagefolder|manifest|npz|hdf5|torchvision|webdataset
    path: str | None = None  # folder, manifest (.csv/.jsonl), array file, or torchvision root
    name: str | None = None  # torchvision dataset class, e.g. CIFAR10 (source: torchvision)
    download: bool = False  # let torchvision download the dataset into path (needs internet)
    test_fraction: float = 0.3  # carved stratified from all data when the source has no test split
    seed: int = 0  # seeds the stratified split, so reruns hit the same cached shards
    shard_size: int = 512  # images per extraction task / HDF5 shard
    limit: int | None = None  # use only the first N samples (stratified); for smoke tests
    max_skipped_fraction: float = 0.05  # fail the job when more samples than this can't be read

    def validate(self) -> None:
        if self.source not in DATA_SOURCES:
            raise SpecError("data.source", f"unknown source {self.source!r}",
                            f"use one of {', '.join(DATA_SOURCES)}")
        if self.source != "digits" and not self.path:
            raise SpecError("data.path", f"source {self.source!r} needs a path",
                            "set data.path to the folder or file holding the images")
        if self.source == "torchvision" and not self.name:
            raise SpecError("data.name", "source 'torchvision' needs a dataset name",
                            "set data.name, e.g. CIFAR10, STL10, Flowers102")
        if not (isinstance(self.max_skipped_fraction, (int, float))
                and 0 <= self.max_skipped_fraction <= 1):
            raise SpecError("data.max_skipped_fraction", f"{self.max_skipped_fraction!r} is "
                            "not in [0, 1]", "use e.g. 0.05")
        if not (isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1):
            raise SpecError("data.test_fraction", f"{self.test_fraction!r} is not in (0, 1)",
                            "use a fraction such as 0.3")
        _positive_int("data.shard_size", self.shard_size, "use e.g. 512 images per shard")
        _int("data.seed", self.seed)
        if self.limit is not None:
            _positive_int("data.limit", self.limit, "omit it to use all samples")


@dataclass(frozen=True)
class BackboneSpec:
    """The frozen pretrained network that turns images into features."""

    name: str = "efficientnet_lite0"  # registry name: efficientnet_lite0 or any torchvision model
    weights: str | None = "DEFAULT"  # weights enum name (IMAGENET1K_V2), a local file, or "random"
    image_size: int | None = None  # override the weights' crop size (resize scales with it)
    batch_size: int | str = 32  # images per forward pass, or auto (GPU: start at 512)
    feature_dtype: str = "float16"  # dtype of the stored features
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "bf16"  # autocast on CUDA: bf16 | fp16 | fp32 (CPU always runs fp32)
    compile: bool = False  # torch.compile the backbone (once per worker process)

    def batch_for(self, device: str) -> int:
        """The batch size to decode and run on ``device`` (``auto`` -> :data:`AUTO_BATCH`)."""
        if self.batch_size == "auto":
            return AUTO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
        return int(self.batch_size)

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("backbone.name", f"{self.name!r} is not a model name",
                            "use e.g. efficientnet_lite0 or resnet50")
        if self.image_size is not None:
            _positive_int("backbone.image_size", self.image_size, "use e.g. 224, or omit it")
            if self.image_size < 16:
                raise SpecError("backbone.image_size", f"{self.image_size} is too small",
                                "use at least 16 pixels (small images are upsampled)")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise SpecError("backbone.batch_size", f"{self.batch_size!r} is not a batch size",
                            "use a whole number such as 32, or auto")
        if self.batch_size != "auto":
            _positive_int("backbone.batch_size", self.batch_size, "use e.g. 32, or auto")
        if self.precision not in PRECISIONS:
            raise SpecError("backbone.precision", f"unknown precision {self.precision!r}",
                            f"use one of {', '.join(PRECISIONS)}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise SpecError("backbone.feature_dtype", f"unknown dtype {self.feature_dtype!r}",
                            f"use one of {', '.join(FEATURE_DTYPES)}")
        _device("backbone.device", self.device)


@dataclass(frozen=True)
class ProbeSpec:
    """Classifiers on the cached features.

    The linear probe follows Kornblith et al. 2019: L2-regularised multinomial logistic
    regression (L-BFGS) on standardized features, the penalty chosen on a validation split over
    a log grid, then refitted on train+val and evaluated once on test.
    """

    l2: float | None = None  # a fixed L2 penalty; None sweeps the grid below (the protocol)
    grid_points: int = 45  # log-spaced L2 values ...
    grid_low: float = 1e-6  # ... from this ...
    grid_high: float = 1e5  # ... to this
    val_fraction: float = 0.2  # carved stratified (seeded) from train when there is no val split
    sweep_tasks: int = 3  # Celery tasks the grid is split across (warm starts within each)
    max_iter: int = 200  # L-BFGS iterations per fit
    heads: tuple[str, ...] = ("linear",)  # any of linear, mlp, knn; the first is the primary
    mlp_hidden: int = 512  # MLP head: hidden units (one hidden layer, ReLU, dropout)
    mlp_dropout: float = 0.5
    mlp_epochs: int = 100  # at most; early stopping on validation accuracy
    mlp_patience: int = 10
    mlp_lr: float = 1e-3  # AdamW
    mlp_weight_decay: float = 1e-4

    def validate(self) -> None:
        if self.l2 is not None and not (isinstance(self.l2, (int, float))
                                        and math.isfinite(self.l2) and self.l2 >= 0):
            raise SpecError("probe.l2", f"{self.l2!r} is not a finite number >= 0",
                            "use e.g. 0.001, or leave it out to sweep the grid")
        _positive_int("probe.grid_points", self.grid_points, "use e.g. 45")
        if not (0 < self.grid_low < self.grid_high):
            raise SpecError("probe.grid_low", f"grid {self.grid_low!r}..{self.grid_high!r} is "
                            "not increasing and positive", "use e.g. 1e-6 .. 1e5")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise SpecError("probe.val_fraction", f"{self.val_fraction!r} is not in (0, 1)",
                            "use e.g. 0.2")
        _positive_int("probe.sweep_tasks", self.sweep_tasks, "use e.g. 3")
        _positive_int("probe.max_iter", self.max_iter, "use e.g. 200")
        if not self.heads:
            raise SpecError("probe.heads", "is empty", f"use some of {', '.join(HEADS)}")
        for head in self.heads:
            if head not in HEADS:
                raise SpecError("probe.heads", f"unknown head {head!r}",
                                f"use some of {', '.join(HEADS)}")
        _positive_int("probe.mlp_hidden", self.mlp_hidden, "use e.g. 512")
        _positive_int("probe.mlp_epochs", self.mlp_epochs, "use e.g. 100")
        _positive_int("probe.mlp_patience", self.mlp_patience, "use e.g. 10")
        if not 0 <= self.mlp_dropout < 1:
            raise SpecError("probe.mlp_dropout", f"{self.mlp_dropout!r} is not in [0, 1)",
                            "use e.g. 0.5")


@dataclass(frozen=True)
class FinetuneSpec:
    """End-to-end fine-tuning of backbone + a new linear head (``strategy: finetune``).

    The validation split is the probe's (``probe.val_fraction``, same seed), so both strategies
    are selected and compared on the same images; test is evaluated once, on the best epoch.
    """

    epochs: int = 10
    batch_size: int = 32  # images per step (an epoch's last partial batch is dropped)
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    lr: float = 1e-3  # the head's peak learning rate (after warmup, then cosine to 0)
    backbone_lr_mult: float = 1.0  # backbone lr = lr x this (< 1: pretrained layers move less)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1  # share of all steps with a linear warmup
    label_smoothing: float = 0.1
    augment: bool = True  # random resized crop (+ flip) on training images
    crop_scale_min: float = 0.35  # random resized crop keeps this much of the area at least
    hflip: bool = True  # random horizontal flip (turn off for digits/text)
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0: every epoch only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (bf16 autocast + channels_last on CUDA)

    def validate(self) -> None:
        _positive_int("finetune.epochs", self.epochs, "use e.g. 10")
        _positive_int("finetune.batch_size", self.batch_size, "use e.g. 32")
        if self.batch_size < 2:
            raise SpecError("finetune.batch_size", "1 is too small for batch norm",
                            "use at least 2, e.g. 32")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError("finetune.optimizer", f"unknown optimizer {self.optimizer!r}",
                            f"use one of {', '.join(OPTIMIZERS)}")
        for name in ("lr", "backbone_lr_mult", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SpecError(f"finetune.{name}", f"{value!r} is not a finite number >= 0",
                                "use e.g. 1e-3 (lr), 0.1 (backbone_lr_mult), 0.05 (weight_decay)")
        if self.lr <= 0:
            raise SpecError("finetune.lr", f"{self.lr!r} must be > 0", "use e.g. 1e-3")
        for name in ("warmup_fraction", "label_smoothing"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise SpecError(f"finetune.{name}", f"{value!r} is not in [0, 1)", "use e.g. 0.1")
        if not (isinstance(self.crop_scale_min, (int, float)) and 0 < self.crop_scale_min <= 1):
            raise SpecError("finetune.crop_scale_min", f"{self.crop_scale_min!r} is not in (0, 1]",
                            "use e.g. 0.08 (ImageNet style) to 0.5 (small objects)")
        if not (isinstance(self.checkpoint_every_steps, int) and self.checkpoint_every_steps >= 0):
            raise SpecError("finetune.checkpoint_every_steps", f"{self.checkpoint_every_steps!r} "
                            "is not a whole number >= 0", "use 0 (every epoch) or e.g. 100")
        _device("finetune.device", self.device)


@dataclass(frozen=True)
class JobSpec:
    """A whole job: data, backbone, strategy and where the outputs go.

    Args:
        name: a label for humans; shows in reports and listings.
        data: the data source, split and shard size.
        backbone: the pretrained network and its preprocessing.
        strategy: ``probe`` (features + classifier heads), ``finetune`` (the whole network
            trained end to end) or ``auto`` (chosen from data size, classes, compute, budget).
        probe: linear-probe settings.
        finetune: fine-tuning settings.
        time_budget_s: optional compute budget in seconds; ``auto`` fine-tunes only if the
            estimate fits in it.
        output: root folder for job outputs (``<output>/jobs/<job id>/``).
        store: root folder of the HDF5 feature store (default ``<output>/store``).

    Raises:
        SpecError: from :meth:`validate` / :meth:`from_dict` for any invalid field.

    Example:
        >>> spec = JobSpec(data=DataSpec(source="digits"), output="/tmp/ff")
        >>> spec.validate()
    """

    name: str = "job"
    data: DataSpec = field(default_factory=DataSpec)
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    strategy: str = "probe"
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    time_budget_s: float | None = None
    output: str = "featurefleet-out"
    store: str | None = None

    def validate(self) -> JobSpec:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError("name", f"{self.name!r} is empty", "give the job a short name")
        if self.strategy not in STRATEGIES:
            raise SpecError("strategy", f"unknown strategy {self.strategy!r}",
                            f"use one of {', '.join(STRATEGIES)}")
        self.data.validate()
        self.backbone.validate()
        self.probe.validate()
        self.finetune.validate()
        if self.time_budget_s is not None and not (
                math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise SpecError("time_budget_s", f"{self.time_budget_s!r} is not a positive number",
                            "use seconds, e.g. 3600, or leave it out")
        if not isinstance(self.output, str) or not self.output:
            raise SpecError("output", f"{self.output!r} is not a folder path",
                            "set output to a folder, e.g. ./featurefleet-out")
        return self

    @property
    def store_dir(self) -> str:
        """The feature store root: a folder, or an fsspec URL such as ``s3://bucket/prefix``."""
        return self.store if self.store else str(Path(self.output) / "store")

    def resolved(self) -> JobSpec:
        """The same spec with every path made absolute (workers may run elsewhere)."""
        data = self.data
        if data.path:
            data = dataclasses.replace(data, path=str(Path(data.path).expanduser().resolve()))
        backbone = self.backbone
        if backbone.weights and _looks_like_path(backbone.weights):
            weights = str(Path(backbone.weights).expanduser().resolve())
            backbone = dataclasses.replace(backbone, weights=weights)
        return dataclasses.replace(
            self, data=data, backbone=backbone,
            output=str(Path(self.output).expanduser().resolve()),
            store=self.store_dir if "://" in self.store_dir
            else str(Path(self.store_dir).expanduser().resolve()),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> JobSpec:
        """Build and validate a spec from plain data (parsed YAML/JSON)."""
        return _build(cls, raw, "").validate()

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        """Load a spec from a ``.yaml``/``.yml``/``.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise SpecError("<file>", f"spec file {str(path)!r} does not exist",
                            "pass the path of a job YAML/JSON file")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as exc:
            detail = " ".join(str(exc).split())
            raise SpecError("<file>", f"{str(path)!r} is not valid YAML/JSON ({detail})",
                            "fix the syntax at the position shown") from None
        return cls.from_dict(raw)


_NESTED = {"data": DataSpec, "backbone": BackboneSpec, "probe": ProbeSpec,
           "finetune": FinetuneSpec}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "<spec>"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(where, f"expected a mapping, got {type(raw).__name__} {raw!r}",
                        "write it as key: value pairs")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SpecError(prefix + str(unknown[0]), "unknown field",
                        f"use one of {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        nested = _NESTED.get(key) if cls is JobSpec else None
        if nested is not None:
            kwargs[key] = _build(nested, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, known[key], value)
    return cls(**kwargs)


def _coerce(name: str, f: dataclasses.Field[Any], value: Any) -> Any:
    kind = str(f.type)
    if kind.startswith("tuple"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise SpecError(name, f"{value!r} is not a list of names", "write e.g. [linear, mlp]")
        return tuple(items)
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise SpecError(name, f"{value!r} is not true/false", "write true or false")
    if value is None:
        if "None" in kind:
            return None
        raise SpecError(name, "must not be empty", "give it a value or remove the line")
    if kind.startswith("int") and not isinstance(value, bool) and isinstance(value, int):
        return value
    if kind == "int | str" and isinstance(value, str):
        return value
    if kind.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind.startswith("float") and isinstance(value, str):
        try:  # YAML reads 1e-3 as a string
            return float(value)
        except ValueError:
            pass
    if kind.startswith("str") and isinstance(value, (str, int, float)) \
            and not isinstance(value, bool):
        return str(value)
    expected = kind.split(" |")[0]
    raise SpecError(name, f"{value!r} is not {'an' if expected == 'int' else 'a'} {expected}",
                    f"write a {expected} value")


def _int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, f"{value!r} is not an integer", "write a whole number")


def _positive_int(name: str, value: Any, fix: str) -> None:
    _int(name, value)
    if value <= 0:
        raise SpecError(name, f"{value!r} must be > 0", fix)


def _device(name: str, value: Any) -> None:
    if not (value in ("auto", "cpu", "cuda") or str(value).startswith("cuda:")):
        raise SpecError(name, f"unknown device {value!r}", "use auto, cpu, cuda or cuda:N")


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors"))
