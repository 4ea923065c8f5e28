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


def exhaustive(a: np.ndarray, b: np.ndarray) -> float:
    """Every scale of ``detail.SCALES`` and every offset at full size, either way round:
    band-passed as ``detail.bandpass`` does (scipy), shrunk with PIL, matched by
    ``skimage.feature.match_template`` (normalized cross-correlation)."""
    from PIL import Image
    from skimage.feature import match_template

    band = detail.bandpass(np.stack([a, b])).numpy()
    best = -1.0
    for big, small in ((band[0], band[1]), (band[1], band[0])):
        for k in detail.SCALES:
            m = round(detail.SIDE * k)
            t = small if m >= detail.SIDE else np.asarray(
                Image.fromarray(small).resize((m, m), Image.Resampling.BILINEAR, reducing_gap=None))
            best = max(best, float(match_template(big, t).max()))
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
