"""The job spec: one typed, frozen description of a job, validated once at the boundary.

The Python API, the CLI and YAML/JSON files all map onto :class:`JobSpec` (pydantic models).
A spec that validates here is never rejected later for a field's shape; one that does not
raises :class:`~pipeline.errors.SpecError` naming the field, the value and the fix, before
anything is enqueued. Every number has bounds.

Example YAML::

    name: digits-lite0
    data: {source: digits, test_fraction: 0.3, seed: 0, shard_size: 512}
    backbone: {name: efficientnet_lite0, batch_size: 32}
    probe: {l2: 0.001}
    output: ./featurefleet-out
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.errors import SpecError, short
from pipeline.spec.fields import Float, Fraction01, Int, Section, fix
from pipeline.spec.sections import EmbedSpec, PredictSpec, QualitySpec, RecommendSpec
from pipeline.spec.validation import custom, parse_document

DATA_SOURCES = ("audio", "audiofolder", "digits", "imagefolder", "images", "manifest", "npz",
                "hdf5", "text", "torchvision", "webdataset")
STRATEGIES = ("probe", "finetune", "auto")
HEADS = ("linear", "mlp", "knn")
AUTO_BATCH = {"cuda": 512, "cpu": 32}  # batch_size: auto starts here (halved on out-of-memory)
MAX_SPEC_BYTES = 1 << 20  # a job file larger than this is not a job file


class DataSpec(Section):
    """Where the samples come from and how they are split and sharded."""

    section: ClassVar[str] = "data"
    source: Literal["audio", "audiofolder", "digits", "imagefolder", "images", "manifest",
                    "npz", "hdf5", "text", "torchvision", "webdataset"] = "digits"
    path: str | None = None  # folder, manifest (.csv/.jsonl), array file, or torchvision root
    name: str | None = None  # torchvision dataset class, e.g. CIFAR10 (source: torchvision)
    download: bool = False  # let torchvision download the dataset into path (needs internet)
    # source: text, a table's columns (the split column is used when the table has it)
    text_column: str = Field("text", min_length=1, max_length=200)
    label_column: str = Field("label", min_length=1, max_length=200)
    split_column: str = Field("split", min_length=1, max_length=200)
    test_fraction: Fraction01 = Field(0.3, json_schema_extra=fix("use a fraction such as 0.3"))
    seed: Int = Field(0, ge=0, lt=2**32, json_schema_extra=fix("use a whole number 0..2**32-1"))
    shard_size: Int = Field(512, gt=0, le=100_000,
                            json_schema_extra=fix("use e.g. 512 images per shard"))
    limit: Int | None = Field(None, gt=0, le=10**9,
                              json_schema_extra=fix("omit it to use all samples"))
    max_skipped_fraction: Float = Field(0.05, ge=0, le=1, json_schema_extra=fix("use e.g. 0.05"))
    # content: hash every sample's bytes at planning (finds exact duplicates, never reuses the
    # features of a rewritten file); stat: size + modification time only (faster on huge
    # remote data, blind to duplicates and to files rewritten with the same size and time)
    fingerprint: Literal["content", "stat"] = "content"
    duplicates: Literal["drop", "keep"] = "drop"  # exact duplicates: keep one copy, or all
    conflicts: Literal["exclude", "error"] = "exclude"  # same bytes, different labels
    allow_unseen_test_classes: bool = False  # a val/test class with no training sample

    @model_validator(mode="after")
    def _paths(self) -> DataSpec:
        if self.source != "digits" and not self.path:
            raise custom("path", f"source {self.source!r} needs a path",
                          "set data.path to the folder or file holding the samples")
        if self.source == "torchvision" and not self.name:
            raise custom("name", "source 'torchvision' needs a dataset name",
                          "set data.name, e.g. CIFAR10, STL10, Flowers102")
        return self


def _device(value: Any) -> Any:
    if not (value in ("auto", "cpu", "cuda") or (isinstance(value, str) and value[5:].isdigit()
                                                  and value.startswith("cuda:"))):
        raise PydanticCustomError("ff", "unknown device {value}", {"value": short(value)})
    return value


Device = Annotated[str, BeforeValidator(_device),
                   Field(json_schema_extra=fix("use auto, cpu, cuda or cuda:N"))]


class BackboneSpec(Section):
    """The frozen pretrained network that turns samples into features."""

    section: ClassVar[str] = "backbone"
    name: str = Field("efficientnet_lite0", min_length=1, max_length=200,
                      json_schema_extra=fix("use e.g. efficientnet_lite0 or resnet50"))
    weights: str | None = "DEFAULT"  # weights enum name (IMAGENET1K_V2), a local file, or random
    image_size: Int | None = Field(None, json_schema_extra=fix(
        "use 16..2048, e.g. 224, or omit it (small images are upsampled)"))
    max_length: Int | None = Field(None, gt=0, le=8192, json_schema_extra=fix(
        "use e.g. 128 or 256 tokens (text backbones), or omit it for the model's own"))
    batch_size: Int | Literal["auto"] = Field(32, json_schema_extra=fix(
        "use a whole number such as 32 (at most 8192), or auto"))
    # auto: float16 (half the store), float32 for an untrained network (weights: random), whose
    # activations can vanish below float16's range
    feature_dtype: Literal["auto", "float16", "float32"] = "auto"
    device: Device = "auto"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # CUDA autocast (CPU runs fp32)
    compile: bool = False  # torch.compile the backbone (once per worker process)
    # scaled: a JPEG larger than the network needs is decoded at 1/2, 1/4 or 1/8 scale in the
    # DCT domain (libjpeg), never below the resize's shorter side: a 12 MP photo costs ~25 ms
    # instead of ~200; full: every pixel decoded, then resized (the features differ slightly);
    # auto: on CUDA workers JPEGs are decoded on the GPU (nvJPEG, batched) and resized there,
    # elsewhere (and other formats) as scaled; each shard records the decoder that ran
    decode: Literal["auto", "scaled", "full"] = "auto"

    @field_validator("image_size")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        if value is not None and not 16 <= value <= 2048:
            raise PydanticCustomError("ff", "{value} is too {how}", {
                "value": short(value), "how": "small" if value < 16 else "large"})
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 < value <= 8192:
            raise PydanticCustomError("ff", "{value} must be > 0 and <= 8192",
                                      {"value": short(value)})
        return value

    def batch_for(self, device: str) -> int:
        """The batch size to decode and run on ``device`` (``auto`` -> :data:`AUTO_BATCH`)."""
        if self.batch_size == "auto":
            return AUTO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
        return int(self.batch_size)


class ProbeSpec(Section):
    """Classifiers on the cached features.

    The linear probe follows Kornblith et al. 2019: L2-regularised multinomial logistic
    regression (L-BFGS) on standardized features, the penalty chosen on a validation split over
    a log grid, then refitted on train+val and evaluated once on test.
    """

    section: ClassVar[str] = "probe"
    l2: Float | None = Field(None, ge=0, le=1e12, json_schema_extra=fix(
        "use e.g. 0.001, or leave it out to sweep the grid"))
    grid_points: Int = Field(45, gt=0, le=1000, json_schema_extra=fix("use e.g. 45"))
    grid_low: Float = Field(1e-6, gt=0, le=1e12, json_schema_extra=fix("use e.g. 1e-6"))
    grid_high: Float = Field(1e5, gt=0, le=1e12, json_schema_extra=fix("use e.g. 1e5"))
    val_fraction: Fraction01 = Field(0.2, json_schema_extra=fix("use e.g. 0.2"))
    sweep_tasks: Int = Field(3, gt=0, le=64, json_schema_extra=fix("use e.g. 3 (at most 64)"))
    max_iter: Int = Field(200, gt=0, le=100_000, json_schema_extra=fix("use e.g. 200"))
    heads: tuple[Literal["linear", "mlp", "knn"], ...] = Field(
        ("linear",), min_length=1, max_length=3,
        json_schema_extra=fix(f"use some of {', '.join(HEADS)}"))
    mlp_hidden: Int = Field(512, gt=0, le=65536, json_schema_extra=fix("use e.g. 512"))
    mlp_dropout: Float = Field(0.5, ge=0, lt=1, json_schema_extra=fix("use e.g. 0.5"))
    mlp_epochs: Int = Field(100, gt=0, le=10_000, json_schema_extra=fix("use e.g. 100"))
    mlp_patience: Int = Field(10, gt=0, le=10_000, json_schema_extra=fix("use e.g. 10"))
    mlp_lr: Float = Field(1e-3, gt=0, le=10, json_schema_extra=fix("use e.g. 1e-3"))
    mlp_weight_decay: Float = Field(1e-4, ge=0, le=10, json_schema_extra=fix("use e.g. 1e-4"))

    @field_validator("heads", mode="before")
    @classmethod
    def _one_head(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _grid(self) -> ProbeSpec:
        if not self.grid_low < self.grid_high:
            raise custom("grid_low", f"grid {self.grid_low!r}..{self.grid_high!r} is not "
                          "increasing", "use e.g. 1e-6 .. 1e5")
        return self


class FinetuneSpec(Section):
    """End-to-end fine-tuning of backbone + a new linear head (``strategy: finetune``).

    The splits are the plan's (the probe's validation ids), so both strategies are selected
    and compared on the same samples; test is evaluated once, on the best epoch.
    """

    section: ClassVar[str] = "finetune"
    epochs: Int = Field(10, gt=0, le=10_000, json_schema_extra=fix("use e.g. 10"))
    batch_size: Int = Field(32, ge=2, le=8192, json_schema_extra=fix(
        "use at least 2 (batch norm needs two samples), e.g. 32"))
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: Float = Field(1e-3, gt=0, le=10, json_schema_extra=fix("use e.g. 1e-3"))
    backbone_lr_mult: Float = Field(1.0, ge=0, le=100, json_schema_extra=fix(
        "use e.g. 0.1 (< 1: the pretrained layers move less than the head)"))
    weight_decay: Float = Field(0.05, ge=0, le=10, json_schema_extra=fix("use e.g. 0.05"))
    warmup_fraction: Float = Field(0.1, ge=0, lt=1, json_schema_extra=fix("use e.g. 0.1"))
    label_smoothing: Float = Field(0.1, ge=0, lt=1, json_schema_extra=fix("use e.g. 0.1"))
    augment: bool = True  # random resized crop (+ flip) on training images
    crop_scale_min: Float = Field(0.35, gt=0, le=1, json_schema_extra=fix(
        "use e.g. 0.08 (ImageNet style) to 0.5 (small objects)"))
    hflip: bool = True  # random horizontal flip (turn off for digits/text)
    checkpoint_every_steps: Int = Field(0, ge=0, le=10**9, json_schema_extra=fix(
        "use 0 (every epoch) or e.g. 100"))
    device: Device = "auto"  # auto | cpu | cuda | cuda:N (bf16 autocast + channels_last on CUDA)
    nodes: Int = Field(1, gt=0, le=4096, json_schema_extra=fix(
        "use the number of GPU worker processes to train on, e.g. 1 or 8"))
    max_restarts: Int = Field(3, ge=0, le=100, json_schema_extra=fix("use e.g. 3"))


AUTO_PRETRAIN_STEPS = 1000  # optimizer steps ``pretrain.epochs: auto`` aims at ...
AUTO_PRETRAIN_EPOCHS = (10, 400)  # ... within these epochs


class PretrainSpec(Section):
    """Pretraining an encoder on the data's images, labels unused (``kind: pretrain``).

    ``autoencoder``: the encoder f (``backbone.name``, random or pretrained init) and a decoder
    g trained to minimise ‖x − g(f(x))‖² (denoising with ``noise``, masked with
    ``mask_fraction``). ``simclr``: two random views of each image pulled together and pushed
    from every other view of the global batch (NT-Xent, gathered across ranks). ``byol``: no
    negatives: an online network predicts a slowly moving (EMA, ``momentum``) target
    network's projection of the other view. ``epochs: auto`` (default) chooses the epochs
    from the data size (about 1,000 optimizer steps, 10-400 epochs; the plan says why). The
    result is a backbone: ``backbone: {name: job:<id>}``.
    """

    section: ClassVar[str] = "pretrain"
    method: Literal["simclr", "byol", "autoencoder"] = "simclr"
    epochs: Int | Literal["auto"] = Field("auto", json_schema_extra=fix(
        "use auto, or a number of epochs from 1 to 10000, e.g. 50"))
    batch_size: Int = Field(128, ge=4, le=65536, json_schema_extra=fix(
        "use e.g. 128 (global: split across the ranks; SimCLR likes it large)"))
    # the same from random and from pretrained weights: continued SimCLR from ImageNet on
    # digits gained at 1e-3 and lost to the frozen encoder at 1e-4 (README, measured)
    lr: Float = Field(1e-3, gt=0, le=10, json_schema_extra=fix("use e.g. 1e-3"))
    weight_decay: Float = Field(1e-6, ge=0, le=10, json_schema_extra=fix("use e.g. 1e-6"))
    warmup_fraction: Float = Field(0.05, ge=0, lt=1, json_schema_extra=fix("use e.g. 0.05"))
    temperature: Float = Field(0.2, gt=0, le=10, json_schema_extra=fix("use e.g. 0.2"))
    projection_dim: Int = Field(128, gt=0, le=8192, json_schema_extra=fix("use e.g. 128"))
    crop_scale_min: Float = Field(0.3, gt=0, le=1, json_schema_extra=fix("use e.g. 0.2-0.5"))
    hflip: bool = True  # turn off for digits and text-like images
    color_jitter: Float = Field(0.4, ge=0, lt=1, json_schema_extra=fix("use e.g. 0.4"))
    grayscale: Float = Field(0.2, ge=0, le=1, json_schema_extra=fix("use e.g. 0.2"))
    blur: Float = Field(0.0, ge=0, le=1, json_schema_extra=fix(
        "use a probability, e.g. 0.5 (Gaussian blur of a view), or 0"))
    solarize: Float = Field(0.0, ge=0, le=1, json_schema_extra=fix(
        "use a probability, e.g. 0.2, or 0"))
    momentum: Float = Field(0.99, ge=0, lt=1, json_schema_extra=fix(
        "use e.g. 0.99 (BYOL's target: rises to 1 on a cosine)"))
    noise: Float = Field(0.0, ge=0, le=10, json_schema_extra=fix(
        "use e.g. 0.2 (denoising autoencoder), or 0"))
    mask_fraction: Float = Field(0.0, ge=0, lt=1, json_schema_extra=fix(
        "use e.g. 0.5 (masked autoencoder), or 0"))
    nodes: Int = Field(1, gt=0, le=4096, json_schema_extra=fix(
        "use the number of GPU worker processes to train on, e.g. 1 or 8"))
    max_restarts: Int = Field(3, ge=0, le=100, json_schema_extra=fix("use e.g. 3"))
    checkpoint_every_steps: Int = Field(0, ge=0, le=10**9, json_schema_extra=fix(
        "use 0 (every epoch) or e.g. 100"))
    eval_every_epochs: Int = Field(5, ge=0, le=10_000, json_schema_extra=fix(
        "use e.g. 5, or 0 for no online evaluation"))
    min_image_side: Int = Field(8, gt=0, le=4096, json_schema_extra=fix(
        "use e.g. 8: smaller images are too small for random crops"))
    device: Device = "auto"

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 < value <= 10_000:
            raise PydanticCustomError("ff", "{value} must be > 0 and <= 10000",
                                      {"value": short(value)})
        return value

    def epochs_for(self, samples: int) -> int:
        """The epochs to train on ``samples`` images: ``epochs``, or for ``auto`` about
        :data:`AUTO_PRETRAIN_STEPS` optimizer steps within :data:`AUTO_PRETRAIN_EPOCHS`."""
        if isinstance(self.epochs, int):
            return self.epochs
        lo, hi = AUTO_PRETRAIN_EPOCHS
        return min(hi, max(lo, round(AUTO_PRETRAIN_STEPS / max(1, samples // self.batch_size))))


# fsspec file systems that only the process that made them can see: never a shared store
PRIVATE_SCHEMES = frozenset({"memory", "cached", "simplecache", "filecache", "blockcache"})


class JobSpec(Section):
    """A whole job: data, backbone, strategy and where the outputs go.

    Args:
        name: a label for humans; shows in reports and listings.
        data: the data source, split and shard size.
        backbone: the pretrained network and its preprocessing.
        strategy: ``probe`` (features + classifier heads), ``finetune`` (the whole network
            trained end to end) or ``auto`` (chosen from data size, classes, compute, budget).
        probe: linear-probe settings.
        finetune: fine-tuning settings.
        predict: batch prediction (``kind: predict``): which trained classifier to apply.
        time_budget_s: optional compute budget in seconds; ``auto`` fine-tunes only if the
            estimate fits in it.
        output: root folder for job outputs (``<output>/jobs/<job id>/``).
        store: root of the HDF5 feature store (default ``<output>/store``): a folder or an
            fsspec URL such as ``s3://bucket/prefix``.

    Raises:
        SpecError: for any invalid field, when the spec is made.

    Example:
        >>> spec = JobSpec(data=DataSpec(source="digits"), output="/tmp/ff")
        >>> spec.replace(backbone={"image_size": 64}).backbone.image_size
        64
    """

    name: str = Field("job", min_length=1, max_length=200,
                      json_schema_extra=fix("give the job a short name"))
    kind: Literal["classify", "pretrain", "quality", "predict", "embed", "recommend"] = \
        "classify"
    data: DataSpec = Field(default_factory=DataSpec)
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    strategy: Literal["probe", "finetune", "auto"] = "probe"
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    predict: PredictSpec = Field(default_factory=PredictSpec)
    embed: EmbedSpec = Field(default_factory=EmbedSpec)
    recommend: RecommendSpec = Field(default_factory=RecommendSpec)
    time_budget_s: Float | None = Field(None, gt=0, le=1e9, json_schema_extra=fix(
        "use seconds, e.g. 3600, or leave it out"))
    output: str = Field("featurefleet-out", min_length=1, json_schema_extra=fix(
        "set output to a folder, e.g. ./featurefleet-out"))
    store: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("ff", "{value} is empty", {"value": short(value)})
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str | None) -> str | None:
        if value and value.startswith("file://"):  # a local path, written as a URL
            return value[len("file://"):] or "/"
        scheme = value.split("://", 1)[0].lower() if value and "://" in value else ""
        if scheme in PRIVATE_SCHEMES:
            raise custom("", f"{short(value)} lives in one process's memory: the workers "
                         "(other processes, other machines) cannot see it",
                         "use a folder on shared storage or an object store (s3://...)")
        return value

    @property
    def store_dir(self) -> str:
        """The feature store root: a folder, or an fsspec URL such as ``s3://bucket/prefix``."""
        return self.store if self.store else str(Path(self.output) / "store")

    def resolved(self) -> JobSpec:
        """The same spec with every local path made absolute (workers may run elsewhere)."""
        name = self.backbone.name
        local = name.startswith("hf:") and Path(name[3:]).expanduser().exists()
        changes: dict[str, Any] = {"backbone": {"name": "hf:" + _absolute(name[3:])}} if local \
            else {}
        changes |= {"output": _absolute(self.output),
                                   "store": self.store_dir if "://" in self.store_dir
                                   else _absolute(self.store_dir)}
        if self.data.path and "://" not in self.data.path:
            changes["data"] = {"path": _absolute(self.data.path)}
        if self.quality.exclude_file and "://" not in self.quality.exclude_file:
            changes["quality"] = {"exclude_file": _absolute(self.quality.exclude_file)}
        if self.recommend.interactions:
            changes["recommend"] = {"interactions": _absolute(self.recommend.interactions)}
        model = self.predict.model
        if model and ("/" in model or model.startswith((".", "~"))):
            changes["predict"] = {"model": _absolute(model)}
        if self.backbone.weights and _looks_like_path(self.backbone.weights):
            changes["backbone"] = {**changes.get("backbone", {}),
                                   "weights": _absolute(self.backbone.weights)}
        return self.replace(**changes)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: Any) -> JobSpec:
        """Build and validate a spec from plain data (parsed YAML/JSON)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise SpecError("<spec>", f"expected a mapping, got {type(raw).__name__} "
                            f"{short(raw)}", "write it as key: value pairs")
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        """Load a spec from a ``.yaml``/``.yml``/``.json`` file.

        Raises:
            SpecError: the file is missing, too large, not YAML/JSON, or a field is invalid.
        """
        path = Path(path)
        if not path.is_file():
            raise SpecError("<file>", f"spec file {str(path)!r} does not exist",
                            "pass the path of a job YAML/JSON file")
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError("<file>", f"{str(path)!r} is {size} bytes (a job file is at most "
                            f"{MAX_SPEC_BYTES})", "pass a job spec, not a data file")
        raw = parse_document(path.read_bytes(), str(path), json_only=path.suffix == ".json")
        return cls.from_dict(raw)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors"))
