"""The crop-aligned near-copy signal (``pipeline.quality.aligned``): checked against a plain
numpy re-sampling, on real crops of a picture, and through the calibration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.quality import aligned
from pipeline.quality.probing import calibrate_copies

SIDE = aligned.SIDE


def picture(seed: int, side: int = 128) -> np.ndarray:
    """A smooth random grey picture (uint8 HxWx3): blobs of several sizes."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = sum(gaussian_filter(rng.normal(size=(side, side)), s) * s for s in (6, 12, 24))
    x = (x - x.min()) / (x.max() - x.min()) * 255
    return np.repeat(x.astype(np.uint8)[..., None], 3, axis=2)


def crop(im: np.ndarray, keep: float, top: int, left: int) -> np.ndarray:
    """``near_copy``'s crop edit, at a chosen place: part of the picture resized back."""
    from PIL import Image

    h = im.shape[0]
    c = int(h * keep)
    return np.asarray(Image.fromarray(im[top:top + c, left:left + c])
                      .resize((h, h), Image.Resampling.BILINEAR))


def signature(im: np.ndarray) -> np.ndarray:
    """``preprocess.signatures`` of one picture (grey, 16 x 16 mean pool, centred, unit)."""
    import torch

    from pipeline.preprocess import signatures

    x = torch.from_numpy(im.astype(np.float32) / 255).permute(2, 0, 1)[None]
    return signatures(x)[0].astype(np.float32)


def resample(img: np.ndarray, k: float, tx: float, ty: float) -> np.ndarray:
    """The crop (scale ``k``, centre ``tx``, ``ty`` in [-1, 1] coordinates) of a 16 x 16
    image, bilinear, edges clamped: written out, independently of torch's grid_sample."""
    n = img.shape[0]
    centres = (np.arange(n) + 0.5) / n * 2 - 1
    out = np.zeros_like(img)
    for r, c in itertools.product(range(n), range(n)):
        y = np.clip(((k * centres[r] + ty) + 1) * n / 2 - 0.5, 0, n - 1)
        x = np.clip(((k * centres[c] + tx) + 1) * n / 2 - 0.5, 0, n - 1)
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
        fy, fx = y - y0, x - x0
        out[r, c] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                     + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return out


def unit(v: np.ndarray) -> np.ndarray:
    v = v.ravel() - v.mean()
    return v / np.linalg.norm(v)


def test_aligned_similarity_is_the_best_correlation_over_the_crop_grid() -> None:
    a, b = signature(picture(1)), signature(crop(picture(1), 0.9, 9, 3))
    want = max(float(unit(resample(x.reshape(SIDE, SIDE), k, tx, ty)) @ unit(y))
               for k, tx, ty in aligned._grid() for x, y in ((a, b), (b, a)))
    want = max(want, float(unit(a) @ unit(b)))
    got = aligned.similarity(np.stack([a, b]), np.array([0]), np.array([1]))
    assert got[0] == pytest.approx(want, abs=1e-4)


def test_pairs_sharing_a_member_score_as_each_pair_alone() -> None:
    """Pairs are grouped by their first member (its crops made once): any order, repeats
    and uneven group sizes give what scoring each pair by itself gives."""
    sigs = np.stack([signature(picture(s)) for s in range(7)])
    a = np.array([3, 0, 3, 5, 0, 3, 6, 0])
    b = np.array([1, 2, 4, 0, 6, 3, 6, 5])  # (3, 3): a sample with itself
    alone = np.array([aligned.scores(sigs, np.array([i]), np.array([[j]]))[0, 0]
                      for i, j in zip(a, b, strict=True)])
    np.testing.assert_allclose(aligned.similarity(sigs, a, b), alone, atol=1e-6)
    assert aligned.similarity(sigs, np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)


def test_a_cropped_copy_regains_its_similarity_and_distinct_pictures_do_not() -> None:
    sigs, pairs = [], []
    for seed in range(6):
        im = picture(seed)
        sigs += [signature(im), signature(crop(im, 0.88 + 0.015 * seed, 2 * seed, 13 - seed))]
        pairs.append((2 * seed, 2 * seed + 1))
    sigs_a = np.stack(sigs)
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    plain = (sigs_a[a] * sigs_a[b]).sum(axis=1)
    copies = aligned.similarity(sigs_a, a, b)
    assert copies.min() > 0.99 and copies.min() > plain.min() + 0.02, (copies, plain)
    assert (copies >= plain - 1e-6).all()  # the identity is part of the grid
    others = aligned.similarity(sigs_a, a, np.roll(b, 1))  # each original vs another's copy
    assert others.max() < 0.9, others
    with pytest.raises(ValueError, match="not 16 x 16"):
        aligned.similarity(np.zeros((2, 30), np.float32), np.array([0]), np.array([1]))


def test_the_aligned_table_scores_each_candidate_once_best_first() -> None:
    rng = np.random.default_rng(0)
    sigs = {i: rng.normal(size=SIDE * SIDE).astype(np.float32) for i in range(6)}
    sigs[5] = sigs[0] + 0.01 * rng.normal(size=SIDE * SIDE).astype(np.float32)
    by_features = np.array([[3, 5], [0, 2]])
    by_signatures = np.array([[5, 0], [7, -1]])  # 7: no signature read; 0 for row 0: itself
    nbr, sim = aligned.table([0, 1], aligned.candidates(by_features, by_signatures, k=2),
                             np.stack([sigs[i] for i in range(6)]), np.arange(6))
    assert nbr[0].tolist()[:2] == [5, 3] and sim[0, 0] > 0.99
    assert sorted(nbr[1][nbr[1] >= 0].tolist()) == [0, 2]
    assert (nbr[0] == 5).sum() == 1  # found by both tables, scored once
    assert np.isneginf(sim[nbr < 0]).all() and sim[0, 0] >= sim[0, 1] and sim[1, 0] >= sim[1, 1]


def test_calibration_adds_the_aligned_signal_for_images_only() -> None:
    """Cropped copies: the aligned signal keeps them, the plain signature loses some; a
    text's signatures (no picture) get no aligned signal."""
    rng = np.random.default_rng(0)
    ims = [picture(s, 96) for s in range(40)]
    sigs = np.stack([signature(im) for im in ims])
    originals = np.arange(20)
    copies = np.stack([signature(crop(ims[i], float(rng.uniform(0.88, 0.96)),
                                      int(rng.integers(0, 8)), int(rng.integers(0, 8))))
                       for _ in range(2) for i in originals])
    feats = rng.normal(size=(40, 8)).astype(np.float32)
    arrays = {"picked": np.arange(40), "originals": originals,
              "copy_features": feats[np.tile(originals, 2)],
              "copy_signatures": copies, "aligned": np.asarray(True)}

    def stored(ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.arange(40), feats, sigs

    out = calibrate_copies(arrays, stored)
    assert out["aligned"]["copy_recall"] >= 0.95 and out["aligned"]["threshold"] is not None
    assert out["aligned"]["copy_similarity"]["p5"] > out["signatures"]["copy_similarity"]["p5"]
    assert out["copy_recall"] >= 0.95
    text = calibrate_copies({**arrays, "aligned": np.asarray(False)}, stored)
    assert "aligned" not in text
