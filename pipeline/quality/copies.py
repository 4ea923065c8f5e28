"""Near copies made the ways copies arise in practice: of an image (JPEG re-encoding,
downscaling and back, a slight off-centre crop, brightness, sensor noise), a text (a word
dropped, repeated, swapped, its case or punctuation changed) or a clip (re-encoded, louder or
softer, a little noise, trimmed). The quality stage calibrates its near-duplicate thresholds
on them (``probing``); ``planted`` plants them to measure the stage."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _pil(im: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(im)


def near_copy(im: Any, rng: np.random.Generator) -> Any:
    """One realistic near-duplicate of ``im`` (uint8 HxWx3, or a text): one or two random
    edits."""
    if isinstance(im, str):
        return near_copy_text(im, rng)
    if not isinstance(im, np.ndarray):
        return near_copy_audio(im, rng)
    from PIL import Image

    h, w = im.shape[:2]

    def jpeg(a: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        _pil(a).save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    def rescale(a: np.ndarray) -> np.ndarray:
        f = float(rng.uniform(0.5, 0.8))
        small = _pil(a).resize((max(1, int(w * f)), max(1, int(h * f))),
                               Image.Resampling.BILINEAR)
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))

    def crop(a: np.ndarray) -> np.ndarray:
        keep = float(rng.uniform(0.9, 0.96))
        ch, cw = max(1, int(h * keep)), max(1, int(w * keep))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        inner = a[top:top + ch, left:left + cw]
        return np.asarray(_pil(inner).resize((w, h), Image.Resampling.BILINEAR))

    def brightness(a: np.ndarray) -> np.ndarray:
        f = float(rng.choice([rng.uniform(0.85, 0.95), rng.uniform(1.05, 1.15)]))
        out: np.ndarray = np.clip(a.astype(np.float32) * f, 0, 255).astype(np.uint8)
        return out

    def noise(a: np.ndarray) -> np.ndarray:
        return np.clip(a + rng.normal(0, 3.0, a.shape), 0, 255).astype(np.uint8)

    edits = [jpeg, rescale, crop, brightness, noise]
    out = im
    for k in rng.choice(len(edits), size=int(rng.integers(1, 3)), replace=False):
        out = edits[int(k)](out)
    return out


def near_copy_text(text: str, rng: np.random.Generator) -> str:
    """A near-duplicate text: one or two edits of the kind copies pick up (a word dropped,
    repeated or swapped with its neighbour, a word's case changed, punctuation or spacing)."""
    words = text.split()
    for _ in range(int(rng.integers(1, 3))):
        if len(words) < 2:
            return text + "."
        i = int(rng.integers(0, len(words) - 1))
        kind = int(rng.integers(0, 5))
        if kind == 0:
            del words[i]
        elif kind == 1:
            words.insert(i, words[i])
        elif kind == 2:
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == 3:
            words[i] = words[i].upper() if words[i].islower() else words[i].lower()
        else:
            words[i] = words[i] + ("," if rng.random() < 0.5 else " -")
    return " ".join(words)


def near_copy_audio(clip: Any, rng: np.random.Generator) -> Any:
    """A near-duplicate clip (``sources.audio.Clip``): one or two edits of the kind copies
    pick up (re-encoded at a lower rate and back, volume changed by up to 4 dB, a little
    noise at 35-45 dB below the signal, up to 5% trimmed from the start or the end)."""
    from pipeline.preprocess import resample
    from pipeline.sources.audio import Clip

    x, rate = np.asarray(clip.samples, np.float32), int(clip.rate)

    def reencode(a: np.ndarray) -> np.ndarray:
        low = max(4000, rate // 2)
        return resample(resample(a, rate, low), low, rate)[:len(a)]

    def gain(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = a * np.float32(10 ** (float(rng.uniform(-4, 4)) / 20))
        return out

    def noise(a: np.ndarray) -> np.ndarray:
        rms = float(np.sqrt(np.mean(np.square(a)))) or 1e-3
        level = rms * 10 ** (-float(rng.uniform(35, 45)) / 20)
        return (a + rng.normal(0, level, a.shape)).astype(np.float32)

    def trim(a: np.ndarray) -> np.ndarray:
        cut = int(len(a) * float(rng.uniform(0.01, 0.05)))
        return a[cut:] if rng.random() < 0.5 else a[:len(a) - cut]

    edits = [reencode, gain, noise, trim]
    for k in rng.choice(len(edits), size=int(rng.integers(1, 3)), replace=False):
        x = edits[int(k)](x)
    return Clip(np.ascontiguousarray(x, np.float32), rate)
