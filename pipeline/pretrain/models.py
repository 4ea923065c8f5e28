"""The networks of pretraining: the encoder f (any registered backbone: its pooled features),
the autoencoder's decoder g, SimCLR's projection head; and the encoder exported as a weights
file any backbone name can load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.backbones import sha256_of
from pipeline.errors import BackboneError, SpecError
from pipeline.fsio import atomic_path


def decoder_plan(crop: int) -> tuple[int, int]:
    """(start side, doublings) of the decoder: ``crop = start * 2**doublings``, start 4..7.

    Raises:
        SpecError: ``crop`` is not a multiple of 8 (the decoder cannot reach it exactly).
    """
    if crop % 8:
        raise SpecError("backbone.image_size", f"{crop} px cannot be decoded exactly (the "
                        "autoencoder's decoder doubles a 4-7 px map)", "use a multiple of 8, "
                        "e.g. 32, 64, 96, 128 or 224")
    side, k = crop, 0
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        k += 1
    return side, k


def build(method: str, arch: str, weights: str | None, crop: int, projection_dim: int,
          device: str) -> tuple[Any, int]:
    """The encoder with its head (``decoder`` or ``projection``) as one module, and the
    encoder's feature dimension."""
    import torch
    from torch import nn

    from pipeline.backbones import load_backbone

    bb = load_backbone(arch, weights, "cpu")
    dim = bb.feature_dim
    if method == "autoencoder":
        side, k = decoder_plan(crop)
        width = 256
        layers: list[nn.Module] = [nn.Linear(dim, width * side * side), nn.ReLU(inplace=True),
                                   nn.Unflatten(1, (width, side, side))]
        for i in range(k):
            c_in, c_out = width >> i, max(32, width >> (i + 1))
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(max(32, width >> k), 3, 3, padding=1))
        head: nn.Module = nn.Sequential(*layers)
    else:
        head = nn.Sequential(nn.Linear(dim, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                             nn.Linear(512, projection_dim))

    class Pretrain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = bb.model
            self.head = head

        def forward(self, x: torch.Tensor) -> Any:
            return self.head(self.encoder(x))

    net = Pretrain().requires_grad_(True)
    return net.to(device).to(memory_format=torch.channels_last), dim


def export_encoder(encoder: Any, arch: str, path: Path) -> str:
    """Save the encoder as a full ``arch`` state dict (what ``backbone.weights: <path>``
    loads, strictly); return the file's sha256.

    Raises:
        BackboneError: the encoder does not fit ``arch`` (a bug, not a user error).
    """
    import torch

    state = full_state_dict(arch, encoder)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return sha256_of(path)


def full_state_dict(arch: str, encoder: Any) -> dict[str, Any]:
    """The state dict of the whole ``arch`` model (its classifier as it was initialised), the
    trunk from ``encoder``."""
    trunk = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    if arch == "efficientnet_lite0":  # the registered wrapper keeps the whole net as .net
        return {k.removeprefix("net."): v for k, v in trunk.items()}
    from torchvision import models

    full = models.get_model(arch, weights=None)
    result = full.load_state_dict(trunk, strict=False)
    if result.unexpected_keys or len(result.missing_keys) > 2:
        raise BackboneError(f"the {arch} encoder does not fit its architecture (missing "
                            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
                            "; fix: report this as a bug")
    return {k: v.detach().cpu() for k, v in full.state_dict().items()}
