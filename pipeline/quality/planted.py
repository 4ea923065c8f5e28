"""A labeled data set with planted problems, to measure the quality stage on data whose truth
is known (the tests and ``benchmarks/quality_planted.py`` use it; so can a user who wants to
see what the stage finds on images like theirs before trusting it).

From clean images and labels, :func:`plant` makes

- **exact copies** (the same pixels again: the planner's content digests find them),
- **near copies** made the ways copies arise in practice (:func:`copies.near_copy`, the
  family the thresholds are calibrated on): JPEG re-encoding, downscaling and back, a slight
  off-centre crop, a brightness change, sensor noise (one or two of these),
- **flipped labels** on a fraction of the originals (never on a copy or its original, so the
  truth stays unambiguous),
- **out-of-domain images** (given, e.g. photo crops among digits), with random labels,

and returns where each planted problem is. Which split a copy lands in is the planner's
(seeded) choice; :func:`score` therefore counts the pairs the plan put in different splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.quality.copies import near_copy


@dataclass
class Planted:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, with the flips
    exact: list[tuple[int, int]] = field(default_factory=list)  # (original, copy)
    near: list[tuple[int, int]] = field(default_factory=list)
    flipped: list[int] = field(default_factory=list)
    true_labels: dict[int, int] = field(default_factory=dict)
    ood: list[int] = field(default_factory=list)


def plant(images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0, *,
          exact: int = 20, near: int = 60, flip_fraction: float = 0.03,
          ood_images: np.ndarray | None = None) -> Planted:
    """Append copies and out-of-domain images to ``images`` (uint8, NxHxW or NxHxWx3) and flip
    a fraction of the original labels."""
    rng = np.random.default_rng(seed)
    base = images if images.ndim == 4 else np.repeat(images[..., None], 3, axis=3)
    base = np.ascontiguousarray(base, np.uint8)
    n = len(base)
    if exact + near > n // 2:
        raise ValueError(f"{exact + near} copies of {n} images: plant at most {n // 2}")
    originals = rng.permutation(n)[:exact + near]
    out_images = [base]
    out_labels = [labels.astype(np.int64).copy()]
    p = Planted(images=base, labels=out_labels[0])
    nxt = n
    for k, o in enumerate(originals.tolist()):
        copy = base[o].copy() if k < exact else near_copy(base[o], rng)
        out_images.append(copy[None])
        out_labels.append(np.asarray([labels[o]], np.int64))
        (p.exact if k < exact else p.near).append((int(o), nxt))
        nxt += 1
    if ood_images is not None and len(ood_images):
        from PIL import Image

        h, w = base.shape[1:3]
        ood = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im, np.uint8))
                                   .convert("RGB")
                                   .resize((w, h), Image.Resampling.BILINEAR))
                        for im in ood_images])
        out_images.append(ood)
        out_labels.append(rng.integers(0, n_classes, len(ood)).astype(np.int64))
        p.ood = list(range(nxt, nxt + len(ood)))
        nxt += len(ood)
    all_labels = np.concatenate(out_labels)
    candidates = np.setdiff1d(np.arange(n), originals)
    flips = rng.permutation(candidates)[:round(flip_fraction * n)]
    for i in sorted(flips.tolist()):
        p.true_labels[int(i)] = int(all_labels[i])
        all_labels[i] = (all_labels[i] + int(rng.integers(1, n_classes))) % n_classes
    p.flipped = sorted(p.true_labels)
    p.images = np.concatenate(out_images)
    p.labels = all_labels
    return p


def photo_crops(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n`` random square crops of scikit-learn's two bundled photos (offline), resized to
    ``side``: out-of-domain images for a data set that is not photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = []
    for k in range(n):
        ph = photos[k % len(photos)]
        s = int(rng.integers(min(ph.shape[:2]) // 4, min(ph.shape[:2]) // 2))
        top, left = int(rng.integers(0, ph.shape[0] - s)), int(rng.integers(0, ph.shape[1] - s))
        out.append(np.asarray(Image.fromarray(ph[top:top + s, left:left + s])
                              .resize((side, side), Image.Resampling.BILINEAR)))
    return np.stack(out)


def score(p: Planted, section: dict[str, Any], split_of: dict[int, str],
          label_recall: float = 0.5) -> dict[str, Any]:
    """What the quality section found of the planted problems.

    - cross-split duplicate recall: planted pairs (exact and near) the plan put in different
      splits, found as a pair or as a leak (or removed at planning, for exact copies);
    - label issues: precision of the flags (also with the out-of-domain images, whose labels
      are random, left out), and precision of the ranked list at
      ``label_recall`` of the flipped labels (the top-k, k as small as reaches that recall);
    - outliers: how many of the out-of-domain images were flagged.
    """
    dup = section.get("duplicates", {})
    found_pairs = {(min(r["a"], r["b"]), max(r["a"], r["b"])) for r in dup.get("top_pairs", [])}
    found_pairs |= {(min(r["index"], r["twin"]), max(r["index"], r["twin"]))
                    for r in dup.get("leaks", [])}
    leaked = set(dup.get("leaked", []))
    removed = {int(r["index"]) for r in section.get("removed_at_planning", [])}
    planted = [(a, b) for a, b in p.exact + p.near if (a in split_of and b in split_of)
               or a in removed or b in removed]
    cross = [(a, b) for a, b in planted
             if a in removed or b in removed or split_of[a] != split_of[b]]

    def hit(a: int, b: int) -> bool:
        if a in removed or b in removed:
            return True
        held = a if split_of[a] == "test" or (split_of[a] == "val" and split_of[b] == "train") \
            else b
        return (min(a, b), max(a, b)) in found_pairs or held in leaked

    cross_found = sum(hit(a, b) for a, b in cross)
    issues = section.get("label_issues", {})
    ranked = [int(i) for i in issues.get("all", [])]
    flipped = set(p.flipped) & set(split_of)
    tp = np.cumsum([i in flipped for i in ranked]) if ranked else np.zeros(0)
    need = int(np.ceil(label_recall * len(flipped)))
    at = int(np.searchsorted(tp, need)) if len(tp) and need and tp[-1] >= need else None
    outl = set(section.get("outliers", {}).get("all", []))
    return {
        "cross_split_pairs": len(cross), "cross_split_found": cross_found,
        "cross_split_recall": round(cross_found / len(cross), 4) if cross else None,
        "flipped": len(flipped), "flagged": len(ranked),
        "flag_precision": round(float(tp[-1]) / len(ranked), 4) if ranked else None,
        "flag_recall": round(float(tp[-1]) / len(flipped), 4) if ranked and flipped else None,
        f"precision_at_recall_{label_recall}": (round(need / (at + 1), 4)
                                                if at is not None else None),
        # an out-of-domain image carries a random label (a photo crop called "7"): a flag on
        # it is no false alarm, nor a planted flip; counted apart
        "flagged_ood": len(set(ranked) & set(p.ood)),
        "flag_precision_ood_apart": (round(float(tp[-1]) / len(set(ranked) - set(p.ood)), 4)
                                     if set(ranked) - set(p.ood) else None),
        "ood": len(p.ood), "ood_flagged": len(outl & set(p.ood)),
        "outliers_flagged": len(outl)}
