"""Property-based fuzzing (hypothesis): whatever a user or a file gives, the outcome is a
result or one ``FeaturefleetError`` line (or a recorded skip with a one-line reason), never a
traceback from deep inside. Derandomized, so a run on a busy machine is the same run."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import DataError, SpecError
from pipeline.sources.arrays import array_source
from pipeline.sources.decode import decode_image
from pipeline.sources.folder import decode_files
from pipeline.sources.manifest import ManifestSource
from pipeline.spec import JobSpec

FUZZ = settings(derandomize=True, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = {
    "data": ["source", "path", "name", "download", "test_fraction", "seed", "shard_size",
             "limit", "max_skipped_fraction", "bogus"],
    "backbone": ["name", "weights", "image_size", "batch_size", "feature_dtype", "device",
                 "precision", "compile", "bogus"],
    "probe": ["l2", "grid_points", "grid_low", "grid_high", "val_fraction", "sweep_tasks",
              "max_iter", "heads", "mlp_hidden", "mlp_dropout", "bogus"],
    "finetune": ["epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_fraction",
                 "label_smoothing", "crop_scale_min", "checkpoint_every_steps", "bogus"],
}
sections = {name: st.dictionaries(st.sampled_from(keys), values, max_size=4)
            for name, keys in FIELDS.items()}
specs = st.fixed_dictionaries({}, optional={
    **sections, "name": values, "strategy": values, "time_budget_s": values,
    "output": values, "store": values}) | values


def one_line(exc: BaseException) -> None:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text and "fix:" in text, text
    assert len(text) < 1500, len(text)


@FUZZ
@given(raw=specs)
def test_any_spec_document_is_a_spec_or_one_line(raw: Any) -> None:
    try:
        spec = JobSpec.from_dict(raw)
    except SpecError as exc:
        one_line(exc)
        return
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # round trip


@FUZZ
@given(text=st.text(max_size=400))
def test_any_yaml_text_is_a_spec_or_one_line(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(text)
        try:
            JobSpec.from_file(path)
        except SpecError as exc:
            one_line(exc)


def _png(tmp: Path, name: str) -> None:
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (10, 200, 30)).save(tmp / name)


cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
rows = st.lists(st.fixed_dictionaries({}, optional={
    "path": st.sampled_from(["a.png", "b.png", "../x.png", "", "missing.png", "a.png"]) | cells,
    "label": st.sampled_from(["cat", "dog", "", "0", "1"]) | cells | st.integers(-5, 5),
    "split": st.sampled_from(["train", "val", "test", "", "holdout"]) | cells}), max_size=8)


@FUZZ
@given(records=rows, kind=st.sampled_from(["csv", "jsonl", "raw"]), raw=st.binary(max_size=200))
def test_any_manifest_is_a_source_or_one_line(records: list[dict[str, Any]], kind: str,
                                              raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _png(root, "a.png")
        _png(root, "b.png")
        if kind == "jsonl":
            path = root / "m.jsonl"
            path.write_text("\n".join(json.dumps(r) for r in records))
        elif kind == "csv":
            path = root / "m.csv"
            lines = ["path,label,split"] + [",".join(str(r.get(c, "")).replace("\n", " ")
                                                     for c in ("path", "label", "split"))
                                            for r in records]
            path.write_text("\n".join(lines))
        else:
            path = root / "m.csv"
            path.write_bytes(raw)
        try:
            src = ManifestSource(path)
        except DataError as exc:
            one_line(exc)
            return
        loaded = src.load(range(len(src)))
        assert len(loaded.images) + len(loaded.failures) == len(src)
        for _i, why in loaded.failures:
            assert "\n" not in why and " at 0x" not in why and why


dtypes = st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, np.float64, np.bool_,
                          np.complex64])
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


@FUZZ
@given(dtype=dtypes, shape=shapes, labels=st.lists(st.integers(-3, 2**40), max_size=6),
       fill=st.sampled_from([0.0, 0.5, 255.0, np.nan, np.inf, -7.0]))
def test_any_arrays_are_a_source_or_one_line(dtype: Any, shape: tuple[int, ...],
                                             labels: list[int], fill: float) -> None:
    with np.errstate(all="ignore"):
        images = np.full(shape, fill).astype(dtype)
    try:
        src = array_source(Path("x.npz"), {"images": images, "labels": np.asarray(labels)},
                           "npz", "numpy.savez")
    except DataError as exc:
        one_line(exc)
        return
    loaded = src.load(range(len(src)))
    assert len(loaded.images) + len(loaded.failures) == len(src)
    for im in loaded.images:
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3


def _valid_images() -> list[bytes]:
    out = []
    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("GIF", "P"),
                      ("BMP", "RGB"), ("WEBP", "RGB"), ("TIFF", "RGB")):
        buf = io.BytesIO()
        Image.new(mode, (17, 9)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


VALID = _valid_images()


@FUZZ
@given(base=st.sampled_from(VALID), flips=st.lists(st.tuples(st.integers(0, 10**6),
                                                             st.integers(0, 255)),
                                                   max_size=6),
       cut=st.integers(0, 10**6) | st.none(), noise=st.binary(max_size=64))
def test_any_image_bytes_decode_or_are_a_recorded_skip(base: bytes, flips: list[tuple[int, int]],
                                                       cut: int | None, noise: bytes) -> None:
    data = bytearray(base)
    for at, value in flips:
        data[at % len(data)] = value
    blob = bytes(data[: cut % (len(data) + 1)] if cut is not None else data) + noise
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.img"
        path.write_bytes(blob)
        loaded = decode_files([path], [0])
    if loaded.images:
        im = loaded.images[0]
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
    else:
        (i, why), = loaded.failures
        assert i == 0 and why and "\n" not in why and " at 0x" not in why


def test_bare_decoder_raises_a_plain_error_for_garbage() -> None:
    """decode_image raises ValueError/OSError (Source.load records it as a skip)."""
    import pytest

    with pytest.raises(ValueError, match="empty file"):
        decode_image(io.BytesIO(b""))
    for blob in (b"\xff\xd8\xff", b"GIF89a", b"\x89PNG\r\n\x1a\n" + b"\0" * 20):
        with pytest.raises((ValueError, OSError)):
            decode_image(blob)
