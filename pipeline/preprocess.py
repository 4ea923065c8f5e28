"""Preprocessing: RGB uint8 images -> the normalized float batch a network expects.

Resize (shorter side) and center-crop for evaluation and extraction; random resized crop and
flip for fine-tuning. Resizing runs on uint8 in channels_last layout; conversion to float and
normalization are one fused pass.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from pipeline.backbones import AnyPreprocessing, AudioPreprocessing, Preprocessing


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 samples at ``rate`` Hz -> at ``target`` Hz (polyphase, anti-aliased)."""
    if rate == target:
        return np.asarray(x, np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return np.asarray(resample_poly(x, target // g, rate // g), np.float32)


def preprocess(images: list[Any], pre: AnyPreprocessing, device: str,
               out: Any | None = None) -> Any:
    """RGB uint8 images (HWC arrays, or HWC tensors decoded on the device) -> normalized float
    NCHW (channels_last) batch.

    Resize the shorter side to ``pre.resize`` and center-crop ``pre.crop``. Small images are
    upsampled, never zero-padded; downsampling is antialiased. Resizing runs on uint8 in
    channels_last layout (torch's vectorised path, ~2x cheaper than on float), one call per
    batch when the images share a size; conversion to float and normalization are one pass
    that writes into ``out`` (a batch this function returned before for the same device,
    reused so that no batch allocates a fresh 19 MB tensor) when it is given and large enough.
    Texts pass through: a text backbone tokenises them itself. Audio clips are resampled to
    the encoder's rate (:func:`resample`); the backbone windows them itself.
    """
    if isinstance(pre, AudioPreprocessing):
        return [resample(c.samples, c.rate, pre.sample_rate) for c in images]
    if not isinstance(pre, Preprocessing):
        return list(images)
    import torch
    import torch.nn.functional as F

    mode = pre.interpolation if pre.interpolation in ("bilinear", "bicubic") else "bilinear"
    n, crop = len(images), pre.crop
    if out is None or out.shape[0] < n or out.shape[2:] != (crop, crop):
        out = torch.empty((n, 3, crop, crop), dtype=torch.float32, device=device)
        out = out.contiguous(memory_format=torch.channels_last)
    dest = out[:n]  # still channels_last-contiguous

    def resize_crop(nhwc: torch.Tensor) -> torch.Tensor:
        h, w = nhwc.shape[1:3]
        scale = pre.resize / min(h, w)
        nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
        x = nhwc.permute(0, 3, 1, 2)  # a channels_last view, no copy
        y = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False,
                          antialias=scale < 1)
        top, left = (nh - crop) // 2, (nw - crop) // 2
        return y[..., top: top + crop, left: left + crop]

    def upload(array: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(array, torch.Tensor):  # decoded on the device already
            return array.to(device)
        t = torch.from_numpy(array)
        if device.startswith("cuda"):  # page-locked host memory: an asynchronous copy
            return t.pin_memory().to(device, non_blocking=True)
        return t

    if len({tuple(im.shape) for im in images}) == 1:
        stacked = torch.stack([upload(im) for im in images]) if any(
            isinstance(im, torch.Tensor) for im in images) else upload(np.stack(images))
        normalize(resize_crop(stacked), pre, out=dest)
    else:
        for i, im in enumerate(images):
            normalize(resize_crop(upload(im[None])), pre, out=dest[i: i + 1])
    return dest


def normalize(x: Any, pre: Preprocessing, out: Any | None = None) -> Any:
    """0..255 NCHW (uint8 or float) -> float ``(x / 255 - mean) / std``, computed as
    ``x * scale + bias`` per channel: one pass that converts, normalizes and writes (into
    ``out`` when given), vectorised for channels_last."""
    import torch

    scale, bias = _affine(tuple(pre.mean), tuple(pre.std), str(x.device))
    if out is None:
        return torch.addcmul(bias, x, scale)
    return torch.addcmul(bias, x, scale, out=out)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[Any, Any]:
    """Per-channel (scale, bias) of :func:`normalize`, made once per recipe and device (not a
    host-to-device copy every batch)."""
    import torch

    s = torch.tensor(std, device=device) * 255.0
    return ((1.0 / s).view(1, 3, 1, 1),
            (-torch.tensor(mean, device=device) * 255.0 / s).view(1, 3, 1, 1))


def augment(images: list[Any], pre: AnyPreprocessing, device: str,
            gen: Any, scale_min: float, hflip: bool, jitter: float = 0.0,
            grayscale: float = 0.0, blur: float = 0.0, solarize: float = 0.0) -> Any:
    """Random resized crop (+ flip, + colour jitter of strength ``jitter``, + grey with
    probability ``grayscale``, + Gaussian blur and solarization with probabilities ``blur``
    and ``solarize``) of uint8 HWC images -> normalized NCHW float batch. Texts pass
    through unchanged (the encoder's dropout is their regulariser); audio clips are resampled
    and their loudness changed by up to 6 dB either way."""
    if isinstance(pre, AudioPreprocessing):
        import torch

        gains = 10 ** (torch.empty(len(images)).uniform_(-6.0, 6.0, generator=gen) / 20)
        return [x * np.float32(g) for x, g in zip(preprocess(images, pre, device),
                                                   gains.tolist(), strict=True)]
    if not isinstance(pre, Preprocessing):
        return list(images)
    import torch
    from torchvision.ops import roi_align

    boxes = []
    for im in images:
        h, w = im.shape[:2]
        area = h * w
        for _ in range(10):  # torchvision's RandomResizedCrop recipe, ratio 3/4..4/3
            target = area * float(torch.empty(1).uniform_(scale_min, 1.0, generator=gen))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3),
                                                           generator=gen)))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if cw <= w and ch <= h:
                x0 = float(torch.rand(1, generator=gen)) * (w - cw)
                y0 = float(torch.rand(1, generator=gen)) * (h - ch)
                break
        else:
            side = min(h, w)
            cw = ch = side
            x0, y0 = (w - side) / 2, (h - side) / 2
        boxes.append((x0, y0, x0 + cw, y0 + ch))
    crop = pre.crop
    out = torch.empty((len(images), 3, crop, crop), device=device)
    same = len({im.shape for im in images}) == 1
    groups = [list(range(len(images)))] if same else [[i] for i in range(len(images))]
    for rows in groups:
        x = torch.from_numpy(np.stack([images[i] for i in rows])).to(device)
        x = x.permute(0, 3, 1, 2).float()
        b = torch.tensor([[j, *boxes[i]] for j, i in enumerate(rows)], dtype=torch.float32,
                         device=device)
        out[rows] = roi_align(x, b, output_size=crop, spatial_scale=1.0, sampling_ratio=-1,
                              aligned=True)
    if hflip:
        flip = torch.rand(len(images), generator=gen) < 0.5
        out[flip.to(device)] = out[flip.to(device)].flip(-1)
    if jitter or grayscale:
        out = _colour(out, gen, jitter, grayscale)
    if blur:
        out = _blur(out, gen, blur)
    if solarize:
        pick = (torch.rand(len(images), generator=gen) < solarize).to(out.device)
        out = torch.where(pick.view(-1, 1, 1, 1) & (out >= 128), 255 - out, out)
    return normalize(out.contiguous(memory_format=torch.channels_last), pre)


def _colour(x: Any, gen: Any, jitter: float, grayscale: float) -> Any:
    """Per-image random brightness, contrast and saturation (factors in 1 ± jitter), then
    grey with probability ``grayscale``; on 0..255 values, batched."""
    import torch

    n = x.shape[0]

    def factor() -> Any:
        return (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * jitter).to(x.device)

    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    if jitter:
        x = x * factor()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor() + mean
        grey = (x * weights).sum(dim=1, keepdim=True)
        x = (x - grey) * factor() + grey
    if grayscale:
        pick = (torch.rand(n, generator=gen) < grayscale).to(x.device)
        grey = (x * weights).sum(dim=1, keepdim=True).expand_as(x)
        x = torch.where(pick.view(n, 1, 1, 1), grey, x)
    return x.clamp(0, 255)


def _blur(x: Any, gen: Any, p: float) -> Any:
    """Gaussian blur of each image with probability ``p``: sigma drawn from 0.1-2.0 px at
    224 px (scaled with the side, as SimCLR's kernel of a tenth of the image), batched as
    one grouped separable convolution."""
    import torch

    n, c, h, w = x.shape
    scale = h / 224.0
    sigma = torch.empty(n).uniform_(0.1, 2.0, generator=gen) * scale
    sigma = torch.where(torch.rand(n, generator=gen) < p, sigma, torch.zeros(n))
    radius = max(1, math.ceil(3 * 2.0 * scale))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # sigma ~ 0: the identity kernel
    k = k.repeat_interleave(c, dim=0).to(x.device, x.dtype)  # (n*c, taps)
    y = x.reshape(1, n * c, h, w)
    pad = torch.nn.functional.pad(y, (radius, radius, radius, radius), mode="reflect") \
        if min(h, w) > radius else torch.nn.functional.pad(y, (radius,) * 4, mode="replicate")
    y = torch.nn.functional.conv2d(pad, k.view(n * c, 1, 1, -1), groups=n * c)
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.reshape(n, c, h, w).contiguous(memory_format=torch.channels_last)


def denormalize(x: Any, pre: Preprocessing) -> np.ndarray:
    """A normalized NCHW batch back to uint8 NHWC images (for pictures in reports)."""
    import torch

    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    pixels = ((x.float() * std + mean) * 255).clamp(0, 255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())


SIGNATURE_SIDE = 16
DETAIL_SIDE = 64  # quality.detail: the pictures fine detail is compared on


def signatures(x: Any) -> np.ndarray:
    """Each sample's signature (a batch of texts: :func:`text_signatures`). Each image of a
    normalized NCHW batch as a 16 x 16 grey thumbnail, centred and scaled
    to unit length (float16, N x 256): the cosine of two signatures is the correlation of the
    thumbnails, unchanged by brightness and contrast and barely by noise, re-encoding or
    rescaling: near duplicates a backbone's features can miss."""
    if isinstance(x, list):
        return text_signatures(x) if not x or isinstance(x[0], str) else audio_signatures(x)
    import torch

    grey = x.float().mean(dim=1, keepdim=True)
    v = torch.nn.functional.adaptive_avg_pool2d(grey, SIGNATURE_SIDE).flatten(1)
    v = v - v.mean(dim=1, keepdim=True)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return np.asarray(v.cpu().numpy(), dtype=np.float16)


def details(x: Any) -> np.ndarray:
    """Each image of a normalized NCHW batch as a 64 x 64 grey picture, stretched to 0-255
    (uint8, N x 4096): the fine detail ``quality.detail`` compares, where copies and distinct
    crops of one smooth photo or texture differ and a 16 x 16 thumbnail cannot tell them
    apart."""
    import torch

    grey = x.float().mean(dim=1, keepdim=True)
    v = torch.nn.functional.adaptive_avg_pool2d(grey, DETAIL_SIDE).flatten(1)
    lo, hi = v.min(dim=1, keepdim=True).values, v.max(dim=1, keepdim=True).values
    v = (v - lo) * (255.0 / (hi - lo).clamp_min(1e-6))
    return np.asarray(v.round().clamp(0, 255).to(torch.uint8).cpu().numpy())


def text_signatures(texts: list[str]) -> np.ndarray:
    """Each text's character 3-grams (lower-cased, spaces collapsed) hashed into as many bins
    as an image signature has pixels, scaled to unit length (float16): the cosine of two
    signatures is high for texts that share most of their wording (a copy with a changed
    word or two), whatever the encoder makes of them."""
    import zlib

    dim = SIGNATURE_SIDE ** 2
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        t = " ".join(text.lower().split())
        for i in range(max(1, len(t) - 2)):
            out[row, zlib.crc32(t[i:i + 3].encode("utf-8", "surrogateescape")) % dim] += 1
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)
    return out.astype(np.float16)


def power_frames(x: np.ndarray, n_fft: int, starts: np.ndarray) -> np.ndarray:
    """Power spectra ``(len(starts), n_fft // 2 + 1)`` of Hann-windowed frames of ``x``
    starting at ``starts`` (a clip shorter than one frame is zero-padded to it)."""
    x = np.asarray(x, np.float32)
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = x[starts[:, None] + np.arange(n_fft)] * np.hanning(n_fft).astype(np.float32)
    out: np.ndarray = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return out


def audio_signatures(clips: list[np.ndarray], rate: int = 16_000) -> np.ndarray:
    """Each clip's log-power in 16 bands (equal steps of a log-frequency axis, 60 Hz to the
    Nyquist) by 16 equal stretches of time (a 16 x 16 "thumbnail" of the spectrogram),
    centred and scaled to unit length (float16): a copy re-encoded, at another volume or with
    a little noise keeps a cosine near 1; different recordings of the same words do not."""
    side = SIGNATURE_SIDE
    out = np.zeros((len(clips), side * side), np.float32)
    n_fft = 512
    freqs = np.fft.rfftfreq(n_fft, 1 / rate)
    edges = np.geomspace(60, rate / 2, side + 1)
    band = np.clip(np.searchsorted(edges, freqs, side="right") - 1, -1, side)
    for row, clip in enumerate(clips):
        n = max(len(clip), n_fft)
        starts = np.arange(0, n - n_fft + 1, max(1, (n - n_fft) // (side * 4) or 1))
        power = power_frames(clip, n_fft, starts)  # (T, F)
        grid = np.zeros((side, side), np.float64)
        t_bin = np.minimum((np.arange(len(starts)) * side) // len(starts), side - 1)
        for b in range(side):
            cols = band == b
            if cols.any():
                per_frame = power[:, cols].sum(axis=1)
                grid[b] = np.bincount(t_bin, per_frame, minlength=side)
        v = np.log10(grid + 1e-10).ravel()
        v = v - v.mean()
        out[row] = v / max(float(np.linalg.norm(v)), 1e-6)
    return out.astype(np.float16)
