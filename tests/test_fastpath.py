"""Fast-path policies that do not need a GPU to check: out-of-memory halving, batch size
auto, precision choice, and torch.compile on a real backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import devices as extract
from pipeline.errors import SpecError
from pipeline.spec import BackboneSpec, JobSpec


def test_out_of_memory_halves_the_batch_and_keeps_every_row() -> None:
    calls: list[int] = []
    weights = torch.arange(12, dtype=torch.float32).view(3, 4)

    def model(x: torch.Tensor) -> torch.Tensor:  # runs out of memory above 10 rows
        calls.append(len(x))
        if len(x) > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x @ weights

    x = torch.randn(40, 3)
    key = ("test-model", "cuda:0", 224)
    extract._FITS.pop(key, None)
    out = extract.forward_halving(model, x, key)
    torch.testing.assert_close(out, x @ weights)
    assert calls[:3] == [40, 20, 10] and extract._FITS[key] == 10
    calls.clear()
    extract.forward_halving(model, x[:25], key)  # later batches start at the size that fit
    assert calls == [10, 10, 5]


def test_other_errors_and_single_rows_are_not_retried() -> None:
    key = ("test-model-2", "cuda:0", 224)

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        extract.forward_halving(broken, torch.zeros(8, 3), key)

    def always_oom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")

    with pytest.raises(RuntimeError, match="can't allocate"):
        extract.forward_halving(always_oom, torch.zeros(8, 3), key)
    assert extract._FITS[key] == 1


def test_batch_size_auto_and_precision() -> None:
    auto = BackboneSpec(batch_size="auto")
    assert auto.batch_for("cuda:0") == 512 and auto.batch_for("cpu") == 32
    assert BackboneSpec(batch_size=64).batch_for("cuda") == 64
    spec = JobSpec.from_dict({"backbone": {"batch_size": "auto", "precision": "fp16",
                                           "compile": True}})
    assert spec.backbone.batch_size == "auto" and spec.backbone.compile is True
    with pytest.raises(SpecError, match=r"backbone.batch_size.*'big'.*auto"):
        JobSpec.from_dict({"backbone": {"batch_size": "big"}})
    with pytest.raises(SpecError, match=r"backbone.precision.*'int4'.*bf16"):
        JobSpec.from_dict({"backbone": {"precision": "int4"}})
    assert extract.autocast_dtype("cuda:0", "bf16") == torch.bfloat16
    assert extract.autocast_dtype("cuda", "fp16") == torch.float16
    assert extract.autocast_dtype("cuda", "fp32") is None
    assert extract.autocast_dtype("cpu", "bf16") is None


@pytest.mark.slow
@pytest.mark.integration  # compiling takes minutes on 2 cores: not in the fast layer
def test_compiled_backbone_gives_the_same_features() -> None:
    eager = extract.cached_backbone("resnet18", "random", "cpu")
    compiled = extract.cached_backbone("resnet18", "random", "cpu", True)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    compiled.model._orig_mod.load_state_dict(eager.model.state_dict())
    with torch.inference_mode():
        a, b = eager.model(x), compiled.model(x)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)
    assert type(compiled.model).__name__ == "OptimizedModule"


def test_preprocess_reuses_its_buffer_and_matches_torchvision() -> None:
    """One buffer serves every batch of a shard (full, short last, mixed sizes) with the values
    a fresh call gives; the values are torchvision's Resize/CenterCrop/Normalize up to the
    uint8 rounding of the resize."""
    import torchvision.transforms.functional as TF

    from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
    from pipeline.preprocess import preprocess

    pre = Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    rng = np.random.default_rng(0)
    full = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(4)]
    buf = preprocess(full, pre, "cpu")
    assert buf.shape == (4, 3, 224, 224) and buf.is_contiguous(memory_format=torch.channels_last)
    short = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(3)]
    mixed = [rng.integers(0, 256, (300, 200, 3), dtype=np.uint8), short[0]]
    for batch in (short, mixed, full):
        got = preprocess(batch, pre, "cpu", out=buf)
        assert got.data_ptr() == buf.data_ptr() and len(got) == len(batch)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, preprocess(batch, pre, "cpu"), rtol=0, atol=0)
    bigger = preprocess(full + short, pre, "cpu", out=buf)  # too small: a new one
    assert len(bigger) == 7 and bigger.data_ptr() != buf.data_ptr()
    for img, ours in zip(mixed, preprocess(mixed, pre, "cpu"), strict=True):
        x = torch.from_numpy(img).permute(2, 0, 1)
        ref = TF.center_crop(TF.resize(x, 256, antialias=True), 224).float() / 255
        ref = TF.normalize(ref, IMAGENET_MEAN, IMAGENET_STD)
        assert (ref - ours).abs().max() <= 2 / 255 / min(IMAGENET_STD) + 1e-5


def test_scaled_jpeg_decode_keeps_the_resize_and_the_network_input(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 12 MP-class photo decoded at a DCT scale: never below the resize's shorter side,
    nearly the same network input as a full decode, and part of the features' content key."""
    from pathlib import Path

    from benchmarks.photos import make_photo_folder
    from pipeline.backbones import resolve_weights
    from pipeline.extract import decode_min_side
    from pipeline.planner import content_key
    from pipeline.preprocess import preprocess
    from pipeline.sources.decode import decode_image

    folder = make_photo_folder(Path(tmp_path) / "ph", 3, (2400, 1800))
    pre = resolve_weights("efficientnet_lite0", "DEFAULT").preprocessing  # resize 256 -> 224
    assert decode_min_side(pre, "full") is None
    side = decode_min_side(pre, "scaled")
    for f in sorted(folder.rglob("*.jpg")):
        raw = f.read_bytes()
        full, scaled = decode_image(raw), decode_image(raw, side)
        assert full.shape == (1800, 2400, 3)
        assert scaled.shape == (450, 600, 3)  # 1/4: the largest scale keeping >= 256 px
        a, b = (preprocess([im], pre, "cpu") for im in (full, scaled))
        assert float((a - b).abs().mean()) < 0.05  # normalized units (1/255 ~ 0.017)
    weights = resolve_weights("efficientnet_lite0", "DEFAULT")
    keys = {mode: content_key(JobSpec.from_dict({"backbone": {"decode": mode}}), "fp", weights,
                              pre, [0, 1]) for mode in ("scaled", "full")}
    assert keys["scaled"] != keys["full"]
    with pytest.raises(SpecError, match=r"backbone\.decode"):
        JobSpec.from_dict({"backbone": {"decode": "fast"}})


def test_device_jpeg_decode_path_on_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The GPU decoding path (``decode: auto`` on a CUDA worker), run on the CPU: JPEGs come
    back undecoded (header checked), one batched ``decode_jpeg`` call decodes them, EXIF
    orientation is applied as Pillow does, a broken JPEG falls back and is then a recorded
    failure, a PNG passes through decoded; the network input equals a full CPU decode's."""
    import io
    from pathlib import Path

    import torch
    from PIL import Image

    from benchmarks.photos import make_photo_folder
    from pipeline.backbones import resolve_weights
    from pipeline.extract import decode_min_side
    from pipeline.preprocess import preprocess
    from pipeline.sources.decode import Encoded, decode_image, decode_on_device
    from pipeline.sources.folder import decode_files

    folder = make_photo_folder(Path(tmp_path) / "ph", 2, (640, 480))
    files = sorted(folder.rglob("*.jpg"))
    rotated = Path(tmp_path) / "rotated.jpg"  # EXIF orientation 6: shown turned 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(files[0]).save(rotated, "JPEG", quality=90, exif=exif)
    broken = Path(tmp_path) / "broken.jpg"
    broken.write_bytes(files[1].read_bytes()[:400])
    png = Path(tmp_path) / "small.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(png)
    paths = [*files, rotated, broken, png]
    loaded = decode_files(paths, list(range(len(paths))), None, encoded=True)
    assert [type(im).__name__ for im in loaded.images] == ["Encoded"] * 3 + ["ndarray"]
    assert [i for i, _ in loaded.failures] == [3]  # no readable header: skipped at reading
    assert loaded.images[2].orientation == 6 and isinstance(loaded.images[0], Encoded)
    garbage = Encoded(b"\xff\xd8\xff" + b"\x00" * 64)  # a header-shaped lie: fails the batch
    batch = [*loaded.images[:3], garbage, loaded.images[3]]
    images, failures = decode_on_device(batch, "cpu")
    assert [k for k, _ in failures] == [3] and len(images) == 4
    assert tuple(images[2].shape) == (640, 480, 3)  # turned like Pillow's exif_transpose
    pre = resolve_weights("efficientnet_lite0", "DEFAULT").preprocessing
    for got, path in zip(images, [files[0], files[1], rotated, png], strict=True):
        ref = decode_image(path.read_bytes())
        assert tuple(got.shape) == ref.shape
        a, b = preprocess([got], pre, "cpu"), preprocess([ref], pre, "cpu")
        assert float((a - b).abs().max()) < 0.1, path  # the same decoder, to rounding
    mixed = preprocess(images, pre, "cpu")  # tensors and arrays in one batch
    assert mixed.shape == (4, 3, 224, 224) and torch.isfinite(mixed).all()
    assert decode_min_side(pre, "auto") == decode_min_side(pre, "scaled") == pre.resize
    buf = io.BytesIO()
    Image.open(files[0]).convert("CMYK").save(buf, "JPEG")
    assert not isinstance(decode_files([_write(tmp_path, buf.getvalue())], [0], None,
                                       encoded=True).images[0], Encoded)


def _write(tmp_path, data: bytes):  # type: ignore[no-untyped-def]
    from pathlib import Path

    p = Path(tmp_path) / "cmyk.jpg"
    p.write_bytes(data)
    return p


def test_core_split_keeps_the_faster_thread_count() -> None:
    """Expensive decoding: the forward pass is tried on all cores and on one fewer, and the
    faster is kept (and remembered per key); cheap decoding never starts a trial."""
    from pipeline.devices import _SPLITS, CoreSplit

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = CoreSplit("cpu", ("test-model", 224, "photos", "cpu-scaled"))
        clock = split.last
        walls = {2: 1.6, 1: 1.0}  # seconds per 32-image batch with 2 or 1 forward threads
        for _ in range(1 + 1 + 2 * CoreSplit.TRIAL):
            clock += walls[split.threads]
            split.step(32, decode_cpu_s=0.9, now=clock)  # ~28 ms of decoding per image
        assert split.threads == 1 and not split.active
        assert _SPLITS[("test-model", 224, "photos", "cpu-scaled")] == 1
        split.restore()
        assert torch.get_num_threads() == 2
        again = CoreSplit("cpu", ("test-model", 224, "photos", "cpu-scaled"))
        assert again.threads == 1 and not again.active  # remembered: no second trial
        again.restore()
        cheap = CoreSplit("cpu", ("test-model", 224, "digits", "cpu-scaled"))
        clock = cheap.last
        for _ in range(3):
            clock += 0.5
            cheap.step(32, decode_cpu_s=0.003, now=clock)
        assert cheap.threads == 2 and not cheap.active and not cheap.trial
        assert CoreSplit("cuda", ("m", 1, "k", "nvjpeg")).active is False
    finally:
        torch.set_num_threads(before)
