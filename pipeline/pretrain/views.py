"""What pretraining feeds the network: SimCLR's two random views of each image, the
autoencoder's (noisy or masked) input with its clean target, and a grid of inputs beside their
reconstructions for the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import Preprocessing
from pipeline.preprocess import augment, denormalize, preprocess
from pipeline.spec import PretrainSpec


def simclr(images: list[np.ndarray], pre: Preprocessing, device: str, gen: Any,
           cfg: PretrainSpec) -> tuple[Any, Any]:
    """Two independent random views per image: resized crop, flip, colour jitter, grey, and
    (when asked for) Gaussian blur and solarization."""
    def view() -> Any:
        return augment(images, pre, device, gen, cfg.crop_scale_min, cfg.hflip,
                       jitter=cfg.color_jitter, grayscale=cfg.grayscale, blur=cfg.blur,
                       solarize=cfg.solarize)

    return view(), view()


def autoencoder(images: list[np.ndarray], pre: Preprocessing, device: str, gen: Any,
                cfg: PretrainSpec) -> tuple[Any, Any]:
    """(input, target): the centre-cropped image as target; the input with Gaussian noise
    (denoising) and/or random square patches blanked out (masked), when asked for."""
    import torch

    target = preprocess(images, pre, device)
    x = target.clone()
    if cfg.noise:
        x = x + cfg.noise * torch.randn(x.shape, generator=gen).to(device)
    if cfg.mask_fraction:
        cells = 8  # an 8 x 8 grid of patches
        keep = (torch.rand((len(images), 1, cells, cells), generator=gen) >= cfg.mask_fraction)
        keep = torch.nn.functional.interpolate(keep.float(), size=x.shape[-2:], mode="nearest")
        x = x * keep.to(device)
    return x.contiguous(memory_format=torch.channels_last), target


def reconstruction_grid(net: Any, data: Any, pre: Preprocessing, device: str, path: Path,
                        n: int = 8) -> Path:
    """A PNG: ``n`` evaluation images (top row) above the autoencoder's reconstructions."""
    import torch
    from PIL import Image

    from pipeline.fsio import atomic_path

    ids = (data.eval_test or data.train)[:n]
    loaded = data.source.load(ids)
    x = preprocess(loaded.images, pre, device)
    was = net.training
    net.eval()
    with torch.inference_mode():
        recon = net(x)
    net.train(was)
    rows = [denormalize(t, pre) for t in (x, recon)]
    tiles = [np.concatenate(list(r), axis=1) for r in rows]  # (crop, n*crop, 3) each
    grid = np.concatenate(tiles, axis=0)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path
