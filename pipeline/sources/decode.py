"""Image decoding: any common file to RGB ``uint8`` (H, W, 3), EXIF rotation applied.

JPEG goes through torchvision's libjpeg-turbo decoder (the same pixels as Pillow's, checked
over baseline, progressive, 4:4:4/4:2:2/4:2:0, grayscale, CMYK and all EXIF orientations;
1.5-2x faster, and it holds the GIL less, which matters to the decode threads). Any other
format, and any JPEG it refuses (a truncated file), goes through Pillow, whose error is the one
reported. Every path reads the image's dimensions from its header first and refuses images
over :data:`MAX_PIXELS` (a 634-byte JPEG can claim 65500 x 65500 pixels).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

JPEG_MAGIC = b"\xff\xd8\xff"
MAX_PIXELS = 150_000_000  # 150 MP: larger than any camera photo, far below a bomb's 4 GP
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


class ImageTooLarge(ValueError):
    """The header claims more pixels than :data:`MAX_PIXELS`."""


def reason(exc: BaseException) -> str:
    """A one-line, address-free reason for a skipped sample."""
    if isinstance(exc, ImageTooLarge):
        return str(exc)
    text = " ".join(str(exc).split())
    # Pillow's "cannot identify image file <_io.BytesIO object at 0x7f...>" names an address
    import re

    text = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the data", text)
    return f"{type(exc).__name__}: {text}"[:300]


def read_bytes(path: str | Path | Any) -> bytes:
    """A file's bytes (a path or a binary file object); an empty file is a clear error."""
    raw = Path(path).read_bytes() if isinstance(path, (str, Path)) else path.read()
    if not raw:
        raise ValueError("empty file")
    return bytes(raw)


def decode_image(path: str | Path | Any, min_size: int | None = None) -> np.ndarray:
    """Decode an image file (a path, a binary file object or bytes) to RGB uint8.

    ``min_size``: the smallest side the consumer needs; a JPEG larger than that is decoded
    at a reduced DCT scale whose shorter side is still at least ``min_size``.

    Raises:
        ImageTooLarge: the header claims more than :data:`MAX_PIXELS` pixels.
        ValueError, OSError: the file is empty or not a readable image.
    """
    raw = path if isinstance(path, bytes) else read_bytes(path)
    if raw[:3] == JPEG_MAGIC:
        return decode_jpeg(raw, min_size)
    return _decode_pil(raw)


def _open(raw: bytes) -> Any:
    """Pillow's image object for ``raw`` (it parses the header only); Pillow's own bomb check
    (twice its default pixel limit) raises our error too."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        import re

        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "too many pixels"
        raise ImageTooLarge(f"image is {size}, over the {MAX_PIXELS / 1e6:.0f} MP limit (a "
                            "decompression bomb?)") from None


def check_complete_jpeg(raw: bytes) -> None:
    """A JPEG whose data ends early (a cut download, a full disk) is refused: libjpeg would
    fill the missing rows with grey and say nothing. The end-of-image marker must follow the
    last scan (0xFF cannot occur inside entropy-coded data, so the marker is unambiguous).

    Raises:
        OSError: no end-of-image marker after the last start-of-scan (as Pillow says of a
            truncated file).
    """
    last_scan = raw.rfind(b"\xff\xda")
    if last_scan < 0 or raw.find(b"\xff\xd9", last_scan) < 0:
        raise OSError("truncated JPEG: its data ends before the end-of-image marker")


def decode_jpeg(raw: bytes, min_size: int | None = None) -> np.ndarray:
    """JPEG bytes -> RGB uint8, checked against :data:`MAX_PIXELS` before any decoding, and
    refused when truncated."""
    check_complete_jpeg(raw)
    with _open(raw) as im:
        _check_size(im.size)
        scaled = min_size is not None and _scale_for(im.size, min_size) > 1
    if not scaled:
        fast = _decode_jpeg_torch(raw)
        if fast is not None:
            return fast
    return _decode_pil(raw, min_size)


def _scale_for(size: tuple[int, int], min_size: int) -> int:
    """The largest libjpeg scale denominator (1, 2, 4, 8) keeping the shorter side >= min_size."""
    short_side = min(size)
    for denom in (8, 4, 2):
        if short_side // denom >= min_size:
            return denom
    return 1


def _check_size(size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageTooLarge(f"image is {w}x{h} pixels ({w * h / 1e6:.0f} MP), over the "
                            f"{MAX_PIXELS / 1e6:.0f} MP limit (a decompression bomb?)")


def _decode_jpeg_torch(raw: bytes) -> np.ndarray | None:
    try:
        import torch
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode

        chw = tv_decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                        mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception:  # Pillow decodes it or says why not
        return None
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())


def _decode_pil(raw: bytes, min_size: int | None = None) -> np.ndarray:
    from PIL import ImageOps

    with _open(raw) as opened:
        _check_size(opened.size)
        if min_size is not None and opened.format == "JPEG":
            w, h = opened.size
            denom = _scale_for(opened.size, min_size)
            if denom > 1:  # libjpeg decodes straight to 1/2, 1/4 or 1/8 of the size
                opened.draft("RGB", (w // denom, h // denom))
        im = ImageOps.exif_transpose(opened)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            scale = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
            return to_rgb_uint8((arr / scale * 255.0).round().astype(np.uint8))
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            return to_rgb_uint8(np.asarray(im.convert("RGBA")))
        return np.asarray(im.convert("RGB"))


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """One image array (HW, HWC or CHW; uint8, uint16 or float) as RGB uint8 (H, W, 3)."""
    a = np.asarray(array)
    if a.dtype == np.bool_:  # a mask: False black, True white
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # CHW -> HWC
    if a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0).round()
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError("image holds NaN or infinite values")
        hi = float(a.max()) if a.size else 1.0
        a = a * 255.0 if hi <= 1.0 else a
    elif a.dtype.kind not in "iub":
        raise ValueError(f"image array has dtype {a.dtype}, expected numbers")
    a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or 0 in a.shape:
        raise ValueError(f"image array has shape {tuple(np.shape(array))}, expected HW, HWC or "
                         "CHW")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:  # composite over white: transparent pixels must not turn black
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = (a[:, :, :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)


MAX_TEXT_BYTES = 1 << 20  # a "text" larger than this is not a document to classify
SNIFF_BYTES = 8192


def decode_text(raw: bytes) -> str:
    """One sample's text from its bytes.

    Raises:
        ValueError: binary data, invalid UTF-8, too large, or nothing but whitespace.
    """
    if b"\0" in raw[:SNIFF_BYTES]:
        raise ValueError("binary data, not text (NUL bytes)")
    if len(raw) > MAX_TEXT_BYTES:
        raise ValueError(f"{len(raw)} bytes, larger than {MAX_TEXT_BYTES} (not one text)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})"
                         ) from None
    if not text.strip():
        raise ValueError("empty text")
    return text.strip()


class Encoded:
    """A JPEG's bytes, header checked against the pixel limit, left for the device to decode
    (``orientation``: its EXIF orientation, applied after decoding)."""

    __slots__ = ("orientation", "raw")

    def __init__(self, raw: bytes, orientation: int = 1) -> None:
        self.raw, self.orientation = raw, orientation


def encoded_or_decoded(raw: bytes, min_size: int | None = None) -> Any:
    """A JPEG as :class:`Encoded` (for a batched device decode); any other image decoded here.

    Raises:
        ImageTooLarge: the header claims more than :data:`MAX_PIXELS` pixels.
        ValueError, OSError: not a readable image.
    """
    if raw[:3] != JPEG_MAGIC:
        return decode_image(raw, min_size)
    check_complete_jpeg(raw)
    with _open(raw) as im:
        _check_size(im.size)
        if im.mode not in ("RGB", "L"):  # CMYK and friends: the CPU path converts them
            return decode_image(raw, min_size)
        return Encoded(raw, int(im.getexif().get(0x0112, 1) or 1))


def _oriented(chw: Any, orientation: int) -> Any:
    """EXIF orientation (1-8) applied to a CHW tensor, as Pillow's ``exif_transpose``."""
    import torch

    if orientation in (2, 4):
        return torch.flip(chw, dims=[2 if orientation == 2 else 1])
    if orientation == 3:
        return torch.rot90(chw, 2, dims=(1, 2))
    if orientation in (5, 7):
        t = chw.transpose(1, 2)
        return t if orientation == 5 else torch.rot90(t, 2, dims=(1, 2))
    if orientation in (6, 8):
        return torch.rot90(chw, -1 if orientation == 6 else 1, dims=(1, 2))
    return chw


def decode_on_device(images: list[Any], device: str,
                     min_size: int | None = None) -> tuple[list[Any], list[tuple[int, str]]]:
    """Decode every :class:`Encoded` item of ``images`` in one batched call on ``device``
    (nvJPEG on CUDA; libjpeg-turbo through the same call on CPU) into HWC uint8 tensors there;
    already-decoded arrays pass through. A batch that fails is decoded one by one, a JPEG the
    device cannot decode falls back to the CPU decoder, and one nobody can decode is returned
    as (position, reason) and left out.

    Returns:
        the decoded images (in order, failures left out) and the failures.
    """
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode

    at = [k for k, im in enumerate(images) if isinstance(im, Encoded)]
    if not at:
        return list(images), []
    bufs = [torch.frombuffer(bytearray(images[k].raw), dtype=torch.uint8) for k in at]
    try:
        chws = list(tv_decode(bufs, mode=ImageReadMode.RGB, device=device))
    except Exception:  # one bad file fails the batch: decode them one at a time
        chws = []
        for buf in bufs:
            try:
                chws.append(tv_decode(buf, mode=ImageReadMode.RGB, device=device))
            except Exception:
                chws.append(None)
    out: list[Any] = list(images)
    failures: list[tuple[int, str]] = []
    for k, chw in zip(at, chws, strict=True):
        if chw is not None:
            out[k] = _oriented(chw, images[k].orientation).permute(1, 2, 0)
            continue
        try:  # the CPU decoder, with its reasons
            out[k] = decode_image(images[k].raw, min_size)
        except Exception as exc:
            failures.append((k, reason(exc)))
            out[k] = None
    return [im for im in out if im is not None], failures
