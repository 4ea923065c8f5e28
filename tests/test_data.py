from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DataError
from pipeline.sources import Source, digests, open_source
from pipeline.sources.decode import _decode_jpeg_torch, decode_image
from pipeline.spec import DataSpec
from pipeline.splits import compute_splits


def split_indices(src: Source, spec: DataSpec, val_fraction: float = 0.2) -> dict:
    return compute_splits(src.labels, src.predefined_splits(), seed=spec.seed,
                          test_fraction=spec.test_fraction, val_fraction=val_fraction,
                          limit=spec.limit)


def test_digits_split_is_stratified_and_seeded() -> None:
    spec = DataSpec(source="digits", test_fraction=0.3, seed=0)
    src = open_source(spec)
    s1, s2 = split_indices(src, spec), split_indices(src, spec)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(s1[k], s2[k])
    assert len(s1["train"]) + len(s1["val"]) + len(s1["test"]) == len(src) == 1797
    assert not set(s1["train"]) & set(s1["test"]) and not set(s1["val"]) & set(s1["train"])
    assert not set(s1["val"]) & set(s1["test"])
    frac = np.bincount(src.labels[s1["test"]]) / np.bincount(src.labels)
    assert np.all(np.abs(frac - 0.3) < 0.02)
    # val: 20% of each class's training samples, carved with the seed
    counts = np.bincount(src.labels[np.concatenate([s1["train"], s1["val"]])])
    assert np.all(np.abs(np.bincount(src.labels[s1["val"]]) - 0.2 * counts) <= 1)
    other = split_indices(src, DataSpec(source="digits", seed=1))
    assert not np.array_equal(other["test"], s1["test"])


def test_digits_decode_to_rgb_uint8() -> None:
    src = open_source(DataSpec(source="digits"))
    loaded = src.load([0, 5])
    assert [im.shape for im in loaded.images] == [(8, 8, 3), (8, 8, 3)]
    assert loaded.images[0].dtype == np.uint8 and loaded.images[0].max() > 200


def test_limit_takes_a_stratified_subset() -> None:
    spec = DataSpec(source="digits", limit=200)
    splits = split_indices(open_source(spec), spec)
    assert sum(len(v) for v in splits.values()) == 200
    assert len(np.unique(open_source(spec).labels[splits["test"]])) == 10


def _folder(root: Path, split: str = "") -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_and_bad_files_are_recorded(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "cat" / "notes.txt").write_text("ignored: not an image extension")
    src = open_source(DataSpec(source="imagefolder", path=str(tmp_path)))
    assert src.class_names == ["cat", "dog"] and len(src) == 13
    bad = src.files.index("cat/broken.jpg")
    loaded = src.load([0, bad, 12])
    assert len(loaded.images) == 2 and loaded.images[0].shape == (12, 10, 3)
    assert loaded.failures[0][0] == bad and "UnidentifiedImageError" in loaded.failures[0][1]
    before = digests(src, range(len(src)))
    Image.new("RGB", (30, 30)).save(tmp_path / "dog" / "0.png")
    after = digests(open_source(DataSpec(source="imagefolder", path=str(tmp_path))),
                    range(len(src)))
    changed = np.flatnonzero((before != after).any(axis=1))
    assert [src.files[i] for i in changed] == ["dog/0.png"]  # that sample, and only it


def test_imagefolder_predefined_splits(tmp_path: Path) -> None:
    _folder(tmp_path, "train")
    _folder(tmp_path, "test")
    spec = DataSpec(source="imagefolder", path=str(tmp_path))
    src = open_source(spec)
    splits = split_indices(src, spec)
    assert len(splits["train"]) + len(splits["val"]) == 12 and len(splits["test"]) == 12
    assert all(src.files[i].startswith("test/") for i in splits["test"])
    assert all(src.files[i].startswith("train/") for i in splits["val"])


def test_image_modes_decode_correctly(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "a.png")
    assert decode_image(tmp_path / "a.png")[0, 0].tolist() == [255, 255, 255]
    g16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    g16.save(tmp_path / "g16.png")
    assert decode_image(tmp_path / "g16.png")[0, 0].tolist() == [255, 255, 255]
    half = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    half.save(tmp_path / "half.png")
    assert decode_image(tmp_path / "half.png")[0, 0].tolist() == [128, 128, 128]
    Image.new("L", (5, 3), 7).save(tmp_path / "l.png")
    assert decode_image(tmp_path / "l.png").shape == (3, 5, 3)
    Image.new("P", (5, 3)).save(tmp_path / "p.png")
    assert decode_image(tmp_path / "p.png").shape == (3, 5, 3)
    Image.new("CMYK", (5, 3), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert decode_image(tmp_path / "c.jpg").min() > 240  # CMYK zero ink is white


def _pillow_rgb(path: Path) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def test_jpeg_fast_path_gives_pillows_pixels(tmp_path: Path) -> None:
    """JPEGs decode through torchvision: real photos (sklearn's bundled samples) and every
    encoding variant give exactly Pillow's pixels; a truncated file fails with Pillow's error."""
    import sklearn

    photos = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    assert len(photos) == 2
    photo = Image.open(photos[0]).convert("RGB").crop((100, 50, 400, 250))
    variants = {"q95": {"quality": 95}, "444": {"subsampling": 0}, "422": {"subsampling": 1},
                "progressive": {"progressive": True, "quality": 70}}
    for name, kw in variants.items():
        photo.save(tmp_path / f"{name}.jpg", **kw)
    photo.convert("L").save(tmp_path / "gray.jpg")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo.save(tmp_path / f"orient{orientation}.jpg", exif=exif.tobytes())
    files = [*photos, *sorted(tmp_path.glob("*.jpg"))]
    for f in files:
        ours = decode_image(f)
        assert _decode_jpeg_torch(f.read_bytes()) is not None, f  # the fast path took it
        np.testing.assert_array_equal(ours, _pillow_rgb(f), err_msg=str(f))
        assert ours.flags["C_CONTIGUOUS"] and ours.dtype == np.uint8
    assert decode_image(tmp_path / "orient6.jpg").shape == (300, 200, 3)  # rotated
    with open(photos[0], "rb") as fh:  # binary file objects (tar members) too
        np.testing.assert_array_equal(decode_image(fh), _pillow_rgb(photos[0]))
    (tmp_path / "trunc.jpg").write_bytes(photos[0].read_bytes()[:5000])
    with pytest.raises(OSError, match="truncated"):
        decode_image(tmp_path / "trunc.jpg")


def test_npz_source_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, images=rng.random((20, 3, 8, 8), dtype=np.float32),
             labels=np.arange(20) % 2, class_names=np.array(["a", "b"]))
    src = open_source(DataSpec(source="npz", path=str(good)))
    assert src.class_names == ["a", "b"] and src.load([0]).images[0].shape == (8, 8, 3)
    cases = {
        "missing.npz": None,
        "nolabels.npz": {"images": np.zeros((3, 4, 4), np.uint8)},
        "mismatch.npz": {"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(2, int)},
        "strlabels.npz": {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array(["x", "y"])},
        "nan.npz": {"images": np.full((2, 4, 4), np.nan), "labels": np.zeros(2, int)},
    }
    for name, arrays in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataError, match="fix:"):
            open_source(DataSpec(source="npz", path=str(tmp_path / name)))


@pytest.mark.parametrize("setup", ["missing", "empty", "no_images", "one_class"])
def test_bad_folders_are_clear_errors(tmp_path: Path, setup: str) -> None:
    root = tmp_path / "data"
    if setup != "missing":
        root.mkdir()
    if setup == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "readme.txt").write_text("x")
    if setup == "one_class":
        (root / "cat").mkdir()
        Image.new("RGB", (4, 4)).save(root / "cat" / "a.png")
        Image.new("RGB", (4, 4)).save(root / "cat" / "b.png")
    spec = DataSpec(source="imagefolder", path=str(root))
    with pytest.raises(DataError, match="fix:") as info:
        split_indices(open_source(spec), spec)
    assert "\n" not in str(info.value)
    if setup != "one_class":
        assert str(root) in str(info.value)
