"""The fine-detail near-copy signal (``pipeline.quality.detail``): checked against an
exhaustive search written with scikit-image's ``match_template``, on real photo crops
(copies against distinct crops of one smooth photo and of one texture), through its table
and its calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.quality import detail
from pipeline.quality.probing import calibrate_detail


def pictures(images: np.ndarray) -> np.ndarray:
    """``preprocess.details`` of uint8 NxHxWx3 images."""
    import torch

    from pipeline.preprocess import details

    return details(torch.from_numpy(np.asarray(images, np.float32) / 255).permute(0, 3, 1, 2))


def photo(name: str) -> np.ndarray:
    from skimage import data as skd

    ph = getattr(skd, name)()
    return ph if ph.ndim == 3 else np.repeat(ph[..., None], 3, axis=2)


def cut(ph: np.ndarray, top: int, left: int, side: int, out: int = 128) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(ph[top:top + side,
                                                              left:left + side, :3]))
                      .resize((out, out), Image.Resampling.BILINEAR))


def crop_edit(im: np.ndarray, keep: float, top: int, left: int) -> np.ndarray:
    h = im.shape[0]
    return cut(im, top, left, int(h * keep), h)


def warped_ncc(big: np.ndarray, small: np.ndarray, scale: float, y: float, x: float) -> float:
    """``big``'s region at (``y``, ``x``), ``scale`` of the side, resampled onto ``small``'s
    grid with scipy (bilinear), against ``small``: the normalized cross-correlation of the
    two, the outer ``detail.RIM`` pixels left out."""
    from scipy.ndimage import affine_transform

    w = affine_transform(big, np.diag([scale, scale]),
                         offset=(y + 0.5 * scale - 0.5, x + 0.5 * scale - 0.5),
                         output_shape=small.shape, order=1, mode="nearest")
    r = detail.RIM
    u, v = w[r:-r, r:-r].ravel(), small[r:-r, r:-r].ravel()
    u, v = u - u.mean(), v - v.mean()
    return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-9))


def exhaustive(a: np.ndarray, b: np.ndarray) -> float:
    """Every scale of ``detail.SCALES`` and every offset at full size, either way round:
    band-passed as ``detail.bandpass`` does (scipy), shrunk with PIL, matched by
    ``skimage.feature.match_template`` (normalized cross-correlation); then, around the
    best, scales 0.0025 and offsets a quarter pixel apart (within 0.01 and 1 pixel), by
    :func:`warped_ncc`."""
    from PIL import Image
    from skimage.feature import match_template

    band = detail.bandpass(np.stack([a, b])).numpy()
    best = -1.0
    for big, small in ((band[0], band[1]), (band[1], band[0])):
        top, at = -1.0, (1.0, 0, 0)
        for k in detail.SCALES:
            m = round(detail.SIDE * k)
            t = small if m >= detail.SIDE else np.asarray(
                Image.fromarray(small).resize((m, m), Image.Resampling.BILINEAR, reducing_gap=None))
            res = match_template(big, t)
            if res.max() > top:
                top = float(res.max())
                at = (m / detail.SIDE, *np.unravel_index(int(res.argmax()), res.shape))
        best = max(best, top)
        if top >= detail.REFINE_FROM:
            for ds in np.linspace(-0.01, 0.01, 9):
                for dy in np.linspace(-1, 1, 9):
                    for dx in np.linspace(-1, 1, 9):
                        best = max(best, warped_ncc(big, small, at[0] + ds, at[1] + dy,
                                                    at[2] + dx))
    return best


@pytest.fixture(scope="module")
def crops() -> dict[str, np.ndarray]:
    """Copies (crop edits, JPEG) of crops of a smooth photo and of a texture, and distinct
    crops of the same photos that do not overlap."""
    import io

    from PIL import Image

    out: dict[str, list[np.ndarray]] = {"orig": [], "copy": [], "other": []}
    for name, boxes in (("retina", [(40, 40, 200), (300, 300, 200)]),
                        ("hubble_deep_field", [(10, 10, 180), (300, 200, 180)]),
                        ("grass", [(0, 0, 150), (200, 250, 150)]),
                        ("brick", [(20, 20, 160), (250, 250, 160)])):
        ph = photo(name)
        a = cut(ph, *boxes[0])
        buf = io.BytesIO()
        Image.fromarray(crop_edit(a, 0.92, 6, 3)).save(buf, "JPEG", quality=75)
        out["orig"].append(a)
        out["copy"].append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        out["other"].append(cut(ph, *boxes[1]))
    return {k: np.stack(v) for k, v in out.items()}


def test_the_coarse_to_fine_search_finds_what_the_exhaustive_one_finds(crops):
    d = pictures(np.concatenate([crops["orig"], crops["copy"], crops["other"]]))
    n = len(crops["orig"])
    for j in range(n):
        for other in (n + j, 2 * n + j):
            ours = float(detail.similarity(d, np.asarray([j]), np.asarray([other]))[0])
            ref = exhaustive(d[j], d[other])
            # the coarse pass may miss the very best offset by a pixel, never by much
            assert ref - 0.05 <= ours <= ref + 0.02, (j, other, ours, ref)


def test_a_copy_cropped_between_the_pixels_is_aligned_between_them():
    """A crop edit rarely lands on the 64 x 64 grid: a copy keeping 93 % of a texture, offset
    by fractions of a pixel. The search's answer reaches what the true alignment gives
    (scipy, :func:`warped_ncc` at the known scale and offset), where the whole-pixel search
    alone falls short."""
    from scipy.ndimage import affine_transform

    rng = np.random.default_rng(3)
    for name in ("grass", "retina", "brick"):
        ph = photo(name)
        a = pictures(cut(ph, 40, 60, 200, 256)[None])[0].reshape(64, 64)
        band_a = detail.bandpass(a.reshape(1, -1)).numpy()[0]
        keep, y, x = 0.93, float(rng.uniform(0.5, 3.5)), float(rng.uniform(0.5, 3.5))
        # the copy: a's region at (y, x), keep of the side, resampled to the full grid
        zoom = affine_transform(a.astype(np.float32), np.diag([keep, keep]),
                                offset=(y + 0.5 * keep - 0.5, x + 0.5 * keep - 0.5),
                                output_shape=(64, 64), order=3, mode="nearest")
        b = np.clip(zoom, 0, 255).round().astype(np.uint8)
        band_b = detail.bandpass(b.reshape(1, -1)).numpy()[0]
        truth = warped_ncc(band_a, band_b, keep, y, x)
        pair = np.stack([a.reshape(-1), b.reshape(-1)])
        ours = float(detail.similarity(pair, np.asarray([0]), np.asarray([1]))[0])
        assert ours >= truth - 0.01, (name, ours, truth)
        assert ours <= 1.0


def test_copies_score_high_and_distinct_crops_of_one_photo_low(crops):
    """Where the 16 x 16 thumbnail cannot tell a copy from a distinct crop of the same smooth
    photo or texture, the fine detail does."""
    d = pictures(np.concatenate([crops["orig"], crops["copy"], crops["other"]]))
    n = len(crops["orig"])
    copy = detail.similarity(d, np.arange(n), n + np.arange(n))
    other = detail.similarity(d, np.arange(n), 2 * n + np.arange(n))
    assert copy.min() > 0.85, copy
    assert other.max() < 0.5, other
    assert (copy - other).min() > 0.4


def test_bad_pictures_are_refused_by_name():
    with pytest.raises(ValueError, match="not 64 x 64"):
        detail.bandpass(np.zeros((2, 256), np.uint8))


def test_the_table_scores_each_pair_once_best_first(crops):
    d = pictures(np.concatenate([crops["orig"], crops["copy"]]))
    n = len(crops["orig"])
    ids = np.arange(2 * n) * 10  # sample indices (sorted), not rows
    query = ids[:n]
    cand = np.stack([ids[n:][::-1], ids[n:], np.full(n, -1), query], axis=1)
    nbr, sim = detail.table(query, cand, d, ids)
    for r in range(n):
        assert nbr[r, 0] == ids[n + r]  # its copy first
        want = detail.similarity(d, np.asarray([r]), np.asarray([n + r]))[0]
        assert sim[r, 0] == pytest.approx(want, abs=1e-6)
        assert (nbr[r] == query[r]).sum() == 0  # never itself
        assert np.isneginf(sim[r][nbr[r] < 0]).all()
        assert list(sim[r]) == sorted(sim[r], reverse=True)


def test_the_calibration_keeps_copies_above_distinct_crops():
    """Calibrated on crops of two textures and two smooth photos and their copies (the
    probe's ``near_copy``): the threshold keeps most copies and few distinct crops pass."""
    from pipeline.quality.copies import near_copy

    rng = np.random.default_rng(0)
    orig = []
    for name in ("grass", "gravel", "retina", "coffee"):
        ph = photo(name)
        h, w = ph.shape[:2]
        for k in range(6):
            s = min(h, w) // 4
            top, left = (k // 3) * (h - s) // 1, (k % 3) * (w - s) // 2
            orig.append(cut(ph, min(top, h - s), left, s))
    orig_arr = np.stack(orig)
    copies = np.stack([near_copy(im, rng) for _ in range(2) for im in orig_arr])
    d_orig, d_copy = pictures(orig_arr), pictures(copies)
    sigs = detail.bandpass(d_orig).numpy().reshape(len(orig_arr), -1)[:, ::17]
    cal, sims = calibrate_detail(d_orig, d_copy, sigs, len(orig_arr))
    assert cal["threshold"] is not None
    assert cal["copy_recall"] >= 0.9
    assert cal["distinct_above_threshold"] <= 0.05
    assert len(sims) == len(copies)


def test_pairs_alike_only_as_thumbnails_are_set_aside():
    """``summary.confirm``: a pair found on a thumbnail signal stays only where its fine
    detail (from the table, else from the scorer) reaches the calibration copies' 1st
    percentile; exact and detail-found pairs always stay."""
    from pipeline.quality import summary
    from pipeline.quality.neighbors import Neighbors

    idx = np.asarray([10, 11, 12, 13])
    nb = Neighbors(idx=idx, y=np.zeros(4, np.int64), nbr=np.full((4, 1), -1),
                   sim=np.full((4, 1), -np.inf, np.float32), nonfinite=np.zeros(0, np.int64),
                   dt_nbr=np.asarray([[11], [10], [-1], [-1]]),
                   dt_sim=np.asarray([[0.95], [0.95], [-np.inf], [-np.inf]], np.float32))
    found = [(10, 11, 0.99, "signatures"), (12, 13, 0.98, "aligned"), (10, 12, 1.0, "exact"),
             (11, 13, 0.96, "detail"), (10, 13, 0.97, "signatures")]
    asked = []

    def score(a, b):
        asked.extend(zip(a.tolist(), b.tolist(), strict=True))
        return np.asarray([0.2 if (x, y) == (12, 13) else 0.9
                           for x, y in zip(a, b, strict=True)])

    cal = {"threshold": 0.93, "copy_similarity": {"p1": 0.85}}
    kept, said = summary.confirm(found, nb, cal, score)
    assert sorted(asked) == [(10, 13), (12, 13)]  # only what the table has not scored
    assert [p[:2] for p in kept] == [(10, 11), (10, 12), (11, 13), (10, 13)]
    assert said["dropped"] == 1 and said["floor"] == 0.85
    # no detail signal in use: nothing changes, nothing is scored
    for off in ({"threshold": None, "copy_similarity": {"p1": 0.85}}, {}):
        assert summary.confirm(found, nb, off, score) == (found, {})


def test_the_best_of_each_run_is_the_best_similarity(crops):
    """``detail.best_of`` (the calibration's nearest other: the whole-pixel search of every
    pair, the refinement of each run's best only) gives what :func:`detail.similarity` gives
    for the best of each run."""
    d = pictures(np.concatenate([crops["orig"], crops["copy"], crops["other"]]))
    n = len(crops["orig"])
    a = np.repeat(np.arange(n), 2)
    b = np.stack([2 * n + np.arange(n), n + np.arange(n)], axis=1).ravel()  # other, copy
    full = detail.similarity(d, a, b).reshape(n, 2).max(axis=1)
    assert np.allclose(detail.best_of(d, a, b, 2), full, atol=1e-6)
    assert (full > 0.85).all()  # each run's best: the copy
