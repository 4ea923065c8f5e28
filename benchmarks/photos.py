"""Folders of real-photo JPEGs at a chosen size, offline: crops of scikit-image's bundled
photos, resized to e.g. 500x375 (ImageNet-like) or 4000x3000 (a 12 MP phone camera), with
sensor-like noise so the files carry as much entropy as a camera's (a smooth upscaled crop
would compress to a tenth of a real photo's size and decode unrealistically fast).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera", "coins", "brick", "grass", "gravel")


def parse_size(text: str) -> tuple[int, int]:
    """``"4000x3000"`` -> (4000, 3000)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"photo size {text!r}: use WIDTHxHEIGHT, e.g. 500x375") from None
    return w, h


def make_photo_folder(root: Path, n: int, size: tuple[int, int] = (500, 375),
                      quality: int = 90, noise: float = 4.0, seed: int = 0) -> Path:
    """``n`` JPEGs of ``size`` (width, height), a class folder per source photo."""
    from PIL import Image
    from skimage import data as skd

    rng = np.random.default_rng(seed)
    w, h = size
    sources = []
    for name in PHOTOS:
        ph = getattr(skd, name)()
        sources.append((name, ph if ph.ndim == 3 else np.repeat(ph[..., None], 3, axis=2)))
    for i in range(n):
        name, ph = sources[i % len(sources)]
        ph_h, ph_w = ph.shape[:2]
        s = float(rng.uniform(0.5, 0.9))  # a crop with the target's aspect ratio
        cw = int(min(ph_w, ph_h * w / h) * s)
        ch = int(cw * h / w)
        top, left = int(rng.integers(0, ph_h - ch + 1)), int(rng.integers(0, ph_w - cw + 1))
        crop = Image.fromarray(np.ascontiguousarray(ph[top:top + ch, left:left + cw, :3]))
        big = np.asarray(crop.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        big += rng.standard_normal(big.shape, dtype=np.float32) * np.float32(noise)
        big = np.clip(big, 0, 255).astype(np.uint8)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(big).save(folder / f"{i:05d}.jpg", quality=quality)
    return root
