"""The networks of pretraining: the encoder f (any registered backbone: its pooled features),
the autoencoder's decoder g, SimCLR's projection head, BYOL's online projector + predictor
beside its momentum (EMA) target; and the encoder exported as a weights file any backbone
name can load."""

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


def mlp(d_in: int, hidden: int, d_out: int) -> Any:
    """Linear, BatchNorm, ReLU, Linear: SimCLR's projection head, BYOL's projector/predictor."""
    from torch import nn

    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out))


def build(method: str, arch: str, weights: str | None, crop: int, projection_dim: int,
          device: str) -> tuple[Any, int]:
    """The encoder with its head (``decoder``, ``projection``, or BYOL's online/target pair)
    as one module, and the encoder's feature dimension."""
    import torch
    from torch import nn

    from pipeline.backbones import load_backbone

    bb = load_backbone(arch, weights, "cpu")
    dim = bb.feature_dim
    if method == "byol":
        net: nn.Module = _byol_module()(bb.model.requires_grad_(True), dim, projection_dim)
        return net.to(device).to(memory_format=torch.channels_last), dim
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
        head = mlp(dim, 512, projection_dim)

    class Pretrain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = bb.model
            self.head = head

        def forward(self, x: torch.Tensor) -> Any:
            return self.head(self.encoder(x))

    net = Pretrain().requires_grad_(True)
    return net.to(device).to(memory_format=torch.channels_last), dim


def _byol_module() -> Any:
    """The BYOL module class (defined on first use: torch is imported lazily)."""
    import copy

    import torch
    from torch import nn

    class ByolNet(nn.Module):
        """BYOL (Grill et al. 2020): the online encoder + projector + predictor predicts the
        target's projection of the other view; the target (encoder + projector) is an
        exponential moving average of the online weights, never trained by gradients."""

        def __init__(self, encoder: nn.Module, dim: int, projection_dim: int) -> None:
            super().__init__()
            hidden = 1024
            self.encoder = encoder
            self.projector = mlp(dim, hidden, projection_dim)
            self.predictor = mlp(projection_dim, hidden, projection_dim)
            self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(online prediction, target projection) of every view in ``x``."""
            p = self.predictor(self.projector(self.encoder(x)))
            with torch.no_grad():
                t = self.target_projector(self.target_encoder(x))
            return p, t

        def online(self) -> list[torch.Tensor]:
            return [*self.encoder.parameters(), *self.projector.parameters()]

        def target(self) -> list[torch.Tensor]:
            return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

        @torch.no_grad()
        def update_target(self, tau: float) -> None:
            """target ← tau · target + (1 − tau) · online."""
            online, target = self.online(), self.target()
            torch._foreach_mul_(target, tau)
            torch._foreach_add_(target, online, alpha=1.0 - tau)

    return ByolNet


def target_momentum(base: float, step: int, total: int) -> float:
    """BYOL's target momentum at ``step`` of ``total``: from ``base`` up to 1 on a cosine."""
    import math

    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1) / 2


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
