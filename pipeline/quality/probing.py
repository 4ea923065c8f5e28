"""What the quality stage asks of the backbone itself, on a seeded sample of the job's images.

**Near-duplicate thresholds, calibrated.** What counts as "near" depends on the backbone and
the data: ImageNet features of a small synthetic image move more under sensor noise than
between two different images of it, while those of photos barely move under re-encoding.
Four signals are calibrated: the backbone's features, the image signatures (16 x 16 grey
thumbnails, centred: their cosine is a correlation, blind to brightness and contrast) and,
for images, those signatures aligned over small crops (``aligned``) and the images' fine
detail aligned (``detail``, on 64 x 64 pictures). Sampled images are
copied the ways copies arise in practice (``copies.near_copy``: JPEG
re-encoding, downscaling and back, a slight off-centre crop, brightness, sensor noise; one or
two of them). A signal's threshold keeps 95% of such copies above it (the 5th percentile of
image-to-copy similarity), raised where needed so that at most 5% of the sampled images have
a *distinct* nearest other above it, never above 0.995. A signal that then keeps fewer than
half the copies cannot tell copies from distinct images in this data and is not used; a pair
is a near duplicate when a used signal puts it at or above its threshold, and
``copy_recall`` is the share of the calibration copies that rule finds.

**Distance from the pretraining domain.** The primary measure is the divergence of the
images' activation statistics from those the network saw in pretraining, which every
BatchNorm layer keeps (running mean and variance): the mean over layers and channels of
KL(data || pretraining) between per-channel Gaussians. Measured with EfficientNet-Lite0
(ImageNet) at 128 px: photo crops of scikit-image's bundled photos 0.15, sklearn's digits
0.62 (``docs/quality.md``); from ``FAR_KL`` the advice is to fine-tune or to pretrain on the
user's own images. The pretrained classifier's mean maximum softmax probability (Hendrycks &
Gimpel 2017) is reported beside it (0.59 and 0.36 there) and used for networks without
BatchNorm. Both thresholds rest on these few measurements: read the number, not only the
verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.backbones import AnyPreprocessing, use_preprocessing
from pipeline.devices import autocast_dtype, cached_backbone
from pipeline.preprocess import details, preprocess, signatures
from pipeline.quality.copies import near_copy
from pipeline.sources import Source

NEAR_KL, FAR_KL = 0.3, 0.45  # BatchNorm divergence: below NEAR_KL near, from FAR_KL far
NEAR_MSP, FAR_MSP = 0.5, 0.3  # max-softmax probability: from NEAR_MSP near, below FAR_MSP far
PERCENTILE = 5.0  # the threshold keeps ~95% of copies above it...
DISTINCT_PERCENTILE = 95.0  # ...unless 5% of distinct images' nearest other would pass it
MIN_RECALL = 0.5  # a signal that keeps fewer copies than this is not used
MAX_THRESHOLD = 0.995
BN_IMAGES = 24  # originals whose activations give the BatchNorm statistics


def _stats(v: np.ndarray) -> dict[str, float]:
    return {q: round(float(np.percentile(v, p)), 5) for q, p in (("p1", 1), ("p5", 5),
                                                                  ("median", 50),
                                                                  ("p95", 95))}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def calibrate(originals: np.ndarray, copies: np.ndarray,
              n: int) -> tuple[dict[str, Any], np.ndarray]:
    """One signal's threshold from the similarity of the first ``n`` originals to their
    copies (``copies``: (copies per original x n) rows) and of every original to its nearest
    *other* sampled original."""
    unit = _unit(originals)
    copy_sims = (_unit(copies).reshape(-1, n, unit.shape[1]) * unit[None, :n]).sum(axis=2)
    gram = unit @ unit.T
    np.fill_diagonal(gram, -np.inf)
    return _threshold(copy_sims.ravel(), gram.max(axis=1)), copy_sims.ravel()


def calibrate_aligned(originals: np.ndarray, copies: np.ndarray,
                      n: int) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`calibrate` for the crop-aligned signatures (``aligned.similarity``); an
    original's nearest other is the best of its ``aligned.CANDIDATES`` nearest by the plain
    signature, as in the neighbour search."""
    from pipeline.quality import aligned

    both = np.concatenate([originals, copies]).astype(np.float32)
    return _calibrate_search(aligned.similarity, both, originals, n, aligned.CANDIDATES)


def calibrate_detail(originals: np.ndarray, copies: np.ndarray, sigs: np.ndarray,
                     n: int) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`calibrate` for the aligned fine detail (``detail.similarity`` of the
    pictures); an original's nearest other is the best of its ``detail.CANDIDATES`` nearest
    by the plain signature (``sigs``, in the same order), as in the neighbour search."""
    from pipeline.quality import detail

    both = np.concatenate([originals, copies])
    return _calibrate_search(detail.similarity, both, sigs, n, detail.CANDIDATES,
                             detail.best_of)


def _calibrate_search(similarity: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                      both: np.ndarray, sigs: np.ndarray, n: int, k: int,
                      best_of: Callable[..., np.ndarray] | None = None,
                      ) -> tuple[dict[str, Any], np.ndarray]:
    """A searched signal's threshold: ``similarity(rows, a, b)`` of the first ``n`` of the
    ``len(sigs)`` originals in ``both`` to their copies (the rows after them), and of every
    original to the best of its ``k`` nearest others by the plain signature ``sigs``
    (``best_of(rows, a, b, k)``, where given: that best alone)."""
    m = len(sigs)
    copy_sims = similarity(both, np.tile(np.arange(n), (len(both) - m) // n),
                           m + np.arange(len(both) - m))
    unit = _unit(sigs)
    gram = unit @ unit.T
    np.fill_diagonal(gram, -np.inf)
    k = min(k, m - 1)
    cand = np.argsort(-gram, axis=1)[:, :k]
    a, b = np.repeat(np.arange(m), k), cand.ravel()
    other = best_of(both, a, b, k) if best_of else similarity(both, a, b).reshape(m, k).max(1)
    return _threshold(copy_sims, other), copy_sims


def _threshold(copy_sims: np.ndarray, nearest_other: np.ndarray) -> dict[str, Any]:
    by_recall = float(np.percentile(copy_sims, PERCENTILE))
    by_distinct = float(np.percentile(nearest_other, DISTINCT_PERCENTILE))
    threshold = min(MAX_THRESHOLD, max(by_recall, by_distinct))
    recall = float((copy_sims >= threshold).mean())
    used = recall >= MIN_RECALL
    return {"threshold": round(threshold, 5) if used else None,
            "copy_recall": round(recall, 4), "copy_similarity": _stats(copy_sims),
            "nearest_other_similarity": _stats(nearest_other),
            "distinct_above_threshold": round(float((nearest_other >= threshold).mean()), 4),
            "raised_for_distinct_images": by_distinct > by_recall,
            **({} if used else {"why_unused": (
                f"only {recall:.0%} of copies score above {threshold:.4f}, the similarity that "
                f"{100 - DISTINCT_PERCENTILE:g}% of distinct images reach: this signal cannot "
                "tell copies from distinct images in this data")})}


Stored = Callable[[list[int]], "tuple[np.ndarray, np.ndarray, np.ndarray | None] | None"]
StoredDetails = Callable[[list[int]], "tuple[np.ndarray, np.ndarray] | None"]


def _pictures(stored_details: StoredDetails | None, ids: np.ndarray,
              arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The stored pictures of ``ids`` in that order, or None (no reader, the copies have
    none, or one is missing)."""
    if stored_details is None or "copy_details" not in arrays:
        return None
    got = stored_details([int(i) for i in ids])
    if got is None:
        return None
    pos = {int(i): k for k, i in enumerate(got[0])}
    if not all(int(i) in pos for i in ids):
        return None
    return got[1][[pos[int(i)] for i in ids]]


def embed(model: Any, batch: list[Any], pre: AnyPreprocessing, device: str,
          precision: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Features (float32; none, 0 columns, without a ``model``), signatures and, for
    images, their 64 x 64 pictures (``preprocess.details``) of a list of decoded samples, 64
    at a time."""
    import torch

    amp = autocast_dtype(device, precision)
    image = getattr(pre, "modality", "image") == "image"
    feats, sigs, pics = [], [], []
    with torch.inference_mode():
        for s in range(0, len(batch), 64):
            x = preprocess(batch[s:s + 64], pre, device)
            sigs.append(signatures(x))
            if image:
                pics.append(details(x))
            if model is None:
                feats.append(np.zeros((len(sigs[-1]), 0), np.float32))
                continue
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                feats.append(model(x).float().cpu().numpy())
    return (np.concatenate(feats), np.concatenate(sigs).astype(np.float32),
            np.concatenate(pics) if pics else None)


PIXEL_COPIES, PIXEL_ORIGINALS = 1, 256  # pixel copies: their 1st percentile, the fine-detail
# floor, is a tail estimate whose spread comes from the originals drawn (docs/quality.md)


def embed_copies(source: Source, ids: Sequence[int], name: str, weights: str | None,
                 pre: AnyPreprocessing, device: str, precision: str, seed: int,
                 n_calibrate: int = 64, n_copies: int = PIXEL_COPIES, n_sample: int = 512,
                 min_size: int | None = None, n_pixel: int = PIXEL_ORIGINALS,
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What the stage needs the backbone for, which needs no stored feature: ``n_copies``
    copies of each of ``n_pixel`` sampled originals (at least ``n_calibrate``), the first
    copy of the first ``n_calibrate`` of them through the backbone (the rest give
    signatures and pictures only: they cost no forward pass), and ``BN_IMAGES`` originals
    for the BatchNorm statistics and the pretrained classifier's confidence;
    :func:`calibrate_copies` completes it from the stored features (round 24-10: 4 copies
    of 64 originals).

    Returns the record (``familiarity``, counts) and the arrays :func:`calibrate_copies`
    reads (``picked``, ``originals`` (in copy order), ``copy_features`` (of the first
    ``backbone_originals``), ``copy_signatures`` and ``copy_details`` (every copy)).
    """
    rng = np.random.default_rng(seed)
    picked = sorted(rng.permutation(np.asarray(ids, np.int64))[:n_sample].tolist())
    candidates = [picked[k] for k in rng.permutation(len(picked))]  # the first get copies
    rng = np.random.default_rng([seed, 1])
    loaded = source.load(candidates[:max(n_pixel, n_calibrate)], min_size)  # as extracted
    images, n = loaded.images, len(loaded.images)
    if n < 2:
        return ({"note": f"{n} readable images sampled: too few to calibrate"}, {})
    bb = cached_backbone(name, weights, device)
    use_preprocessing(bb.model, pre)
    bn = BatchNormStats(bb.model)
    try:
        bn.active = True  # (reading every layer costs half a forward pass: one batch only)
        own, _, _ = embed(bb.model, images[:BN_IMAGES], pre, device, precision)
        bn.active = False
        copies = [near_copy(images[i], rng) for _ in range(n_copies) for i in range(n)]
        f = min(n_calibrate, n)
        cf, cs, cd = embed(bb.model, copies[:f], pre, device, precision)
        if f < len(copies):  # the others: pixels only
            _, cs2, cd2 = embed(None, copies[f:], pre, device, precision)
            cs = np.concatenate([cs, cs2])
            cd = None if cd is None or cd2 is None else np.concatenate([cd, cd2])
    finally:
        bn.close()
    record = {"calibrated_on": n, "copies": n * n_copies, "copies_through_backbone": f,
              "familiarity": familiarity(bb.pretrained_head, own, bn.divergence())}
    return record, {"picked": np.asarray(picked, np.int64),
                    "originals": np.asarray(loaded.indices, np.int64),
                    "backbone_originals": np.asarray(f),
                    "copy_features": cf.astype(np.float32),
                    "copy_signatures": cs.astype(np.float32),
                    **({} if cd is None else {"copy_details": cd}),
                    "aligned": np.asarray(getattr(pre, "modality", "image") == "image")}


def calibrate_copies(arrays: dict[str, np.ndarray], stored: Stored,
                     stored_details: StoredDetails | None = None) -> dict[str, Any]:
    """Each signal's threshold from the copies :func:`embed_copies` made and the features
    and signatures extraction stored for the sampled originals (``stored(ids)``: indices,
    features, signatures, or None where the shards have no signatures: features only), and
    their pictures (``stored_details(ids)``: indices, pictures; None where the shards have
    none: no fine-detail signal)."""
    if not len(arrays.get("originals", ())):
        return {"note": "no calibration copies"}
    originals = [int(i) for i in arrays["originals"]]
    picked = [int(i) for i in arrays["picked"]]
    have = stored(picked)
    if have is None or len(have[0]) < 2:
        return {"note": "the sampled images' stored features are unreadable: not calibrated"}
    idx, sf, ss = have
    ok = np.isfinite(sf).all(axis=1) & (ss is None or np.isfinite(ss).all(axis=1))
    pos = {int(idx[k]): int(k) for k in np.flatnonzero(ok)}
    keep = [j for j, i in enumerate(originals) if i in pos]  # extraction may have skipped one
    n, m = len(originals), len(keep)
    if m < 2:
        return {"note": f"{m} calibrated originals have stored features: too few to calibrate"}
    first = [pos[originals[j]] for j in keep]
    rest = [pos[i] for i in picked if i in pos and pos[i] not in set(first)]
    rows = first + rest
    # copy r of original j: row r * n + j of the pixel copies, r * nb + j of the backbone's
    # (of the first nb originals); calibrate wants them by round, in ``keep`` order
    nb = int(arrays.get("backbone_originals", n))
    kept_b = [j for j in keep if j < nb]

    def by_round(copies: np.ndarray, width: int, some: list[int]) -> list[int]:
        return [r * width + j for r in range(len(copies) // width) for j in some]

    order = by_round(arrays["copy_features"], nb, kept_b)
    order_s = by_round(arrays["copy_signatures"], n, keep)
    out: dict[str, Any] = {"calibrated_on": m, "copies": len(order_s),
                           "copies_through_backbone": len(order), "sampled": len(rows),
                           "read_from_store": len(rows)}
    out["features"], f_sims = calibrate(sf[rows].astype(np.float32),
                                        arrays["copy_features"][order], len(kept_b))
    signals = [(out["features"], f_sims)]
    if ss is None:
        out["signatures"] = {"threshold": None, "why_unused": "the shards have no signatures "
                             "(written by an older version): features only"}
    else:
        sigs, copies = ss[rows].astype(np.float32), arrays["copy_signatures"][order_s]
        out["signatures"], s_sims = calibrate(sigs, copies, m)
        signals.append((out["signatures"], s_sims))
        if bool(arrays.get("aligned", False)):  # images: their crop-aligned signatures too
            out["aligned"], a_sims = calibrate_aligned(sigs, copies, m)
            signals.append((out["aligned"], a_sims))
            pics = _pictures(stored_details, idx[rows], arrays)
            if pics is not None:  # and their fine detail
                out["detail"], d_sims = calibrate_detail(pics,
                                                         arrays["copy_details"][order_s],
                                                         sigs, m)
                signals.append((out["detail"], d_sims))
    caught = np.zeros(len(f_sims), bool)
    for cal, sims in signals:  # (over the copies every signal saw: the backbone's rounds)
        if cal["threshold"] is not None:
            caught |= sims[:len(caught)] >= cal["threshold"]
    out["copy_recall"] = round(float(caught.mean()), 4)
    return out


def probe_backbone(source: Source, ids: Sequence[int], name: str, weights: str | None,
                   pre: AnyPreprocessing, device: str, precision: str, seed: int,
                   n_calibrate: int = 64, n_copies: int = PIXEL_COPIES,
                   n_sample: int = 512, min_size: int | None = None,
                   stored: Stored | None = None,
                   n_pixel: int = PIXEL_ORIGINALS) -> dict[str, Any]:
    """Both halves in one call (:func:`embed_copies`, then :func:`calibrate_copies`);
    without ``stored`` the backbone also embeds every sampled image itself."""
    record, arrays = embed_copies(source, ids, name, weights, pre, device, precision, seed,
                                  n_calibrate, n_copies, n_sample, min_size, n_pixel)
    if not arrays:
        return record
    if stored is None:
        bb = cached_backbone(name, weights, device)
        use_preprocessing(bb.model, pre)

        made: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def stored(some: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            loaded = source.load(some, min_size)
            idx = np.asarray(loaded.indices, np.int64)
            feats, sigs, pics = embed(bb.model, loaded.images, pre, device, precision)
            if pics is not None:
                made["details"] = (idx, pics)
            return idx, feats, sigs

        def stored_details(some: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
            return made.get("details")  # made by ``stored`` (it is called first)

        return {**record, **calibrate_copies(arrays, stored, stored_details)}
    return {**record, **calibrate_copies(arrays, stored)}


class BatchNormStats:
    """Per-channel mean and variance of what reaches each BatchNorm layer, pooled over the
    batches seen while ``active``, against the layer's running statistics (those of the
    pretraining data)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.active = False
        self.sums: dict[int, list[Any]] = {}
        self.layers = [m for m in model.modules()
                       if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       and m.running_mean is not None]
        self.hooks = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(self.layers)]

    def _hook(self, k: int) -> Callable[..., None]:
        def hook(_m: Any, inputs: tuple[Any, ...], _out: Any) -> None:
            if self.active:
                x = inputs[0].detach().float()
                dims = [d for d in range(x.dim()) if d != 1]
                count = x.numel() // x.shape[1]
                s = self.sums.setdefault(k, [0.0, 0.0, 0])
                s[0] = s[0] + x.sum(dims).double().cpu()
                s[1] = s[1] + (x * x).sum(dims).double().cpu()
                s[2] += count
        return hook

    def divergence(self) -> float | None:
        """Mean over layers and channels of KL(data || pretraining) between per-channel
        Gaussians; None without BatchNorm layers."""
        import torch

        kls = []
        for k, (s1, s2, count) in self.sums.items():
            m = self.layers[k]
            mu = s1 / count
            var = (s2 / count - mu * mu).clamp_min(0) + m.eps
            rm, rv = m.running_mean, m.running_var
            if rm is None or rv is None:
                continue
            rm, rv = rm.double().cpu(), rv.double().cpu() + m.eps
            kl = 0.5 * (torch.log(rv / var) + (var + (mu - rm) ** 2) / rv - 1)
            kls.append(float(kl.mean()))
        return round(float(np.mean(kls)), 4) if kls else None

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def familiarity(head: Any, feats: np.ndarray, bn_kl: float | None) -> dict[str, Any]:
    """How far the images are from the pretraining data: the BatchNorm statistics'
    divergence (primary, where the network has BatchNorm) and the pretrained classifier's
    mean max-softmax probability."""
    out: dict[str, Any] = {"samples": len(feats)}
    if bn_kl is not None:
        out["batchnorm_kl"] = bn_kl
    if head is not None:
        import torch

        with torch.inference_mode():
            p = torch.softmax(head.float()(torch.from_numpy(feats).float()), dim=1).numpy()
        out["mean_max_probability"] = round(float(p.max(axis=1).mean()), 4)
    if bn_kl is not None:
        verdict = "far" if bn_kl >= FAR_KL else "near" if bn_kl < NEAR_KL else "moderate"
        how = f"BatchNorm statistics' divergence {bn_kl:.3f}"
    elif "mean_max_probability" in out:
        msp = out["mean_max_probability"]
        verdict = "far" if msp < FAR_MSP else "near" if msp >= NEAR_MSP else "moderate"
        how = f"mean max-softmax probability {msp:.3f}"
    else:
        out["note"] = ("the backbone has neither BatchNorm statistics nor a pretrained "
                       "classifier (e.g. a transformer from a weights file): distance from the "
                       "pretraining domain is not measured")
        return out
    out["domain"] = verdict
    out["measured_by"] = how
    out["advice"] = {
        "far": "the images look unlike the backbone's pretraining data: expect frozen "
               "features to underperform; fine-tune (strategy: finetune), or pretrain an "
               "encoder on your own images (kind: pretrain) and probe that",
        "moderate": "the images are partly like the pretraining data: compare the probe with "
                    "fine-tuning (featurefleet compare --strategies probe,finetune)",
        "near": "the images look like the backbone's pretraining data: frozen features "
                "should transfer well"}[verdict]
    return out
