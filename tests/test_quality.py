"""The data-quality stage: each computation on data whose answer is known (fast layer), then
the whole stage through a real cluster on photos with planted problems (integration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.quality import curve, labels, neighbors, planted, shift, summary
from pipeline.quality.probing import calibrate, familiarity, near_copy
from pipeline.reports import quality as quality_report
from pipeline.store.shards import ShardData, write_shard


def shards(tmp: Path, x: np.ndarray, y: np.ndarray, size: int = 64,
           sigs: np.ndarray | None = None) -> list[str]:
    paths = []
    for s in range(0, len(x), size):
        e = min(len(x), s + size)
        p = tmp / f"{s}-{e}.h5"
        write_shard(p, ShardData(features=x[s:e].astype(np.float16), labels=y[s:e],
                                 indices=np.arange(s, e), sample_ids=[str(i) for i in
                                                                      range(s, e)],
                                 skipped=[], attrs={},
                                 signatures=None if sigs is None else sigs[s:e]))
        paths.append(str(p))
    return paths


def test_neighbors_match_brute_force_in_blocks_and_leave_out_nan(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    x[7] = np.nan
    y = rng.integers(0, 3, 300)
    paths = shards(tmp_path, x, y)
    ids = list(range(300))
    nb = neighbors.search(paths, ids[100:200], ids, k=5, ref_rows=70)  # 5 reference blocks
    assert nb.nonfinite.tolist() == [] and len(nb.idx) == 100
    whole = neighbors.search(paths, ids, ids, k=5)
    assert whole.nonfinite.tolist() == [7] and 7 not in whole.idx and 7 not in whole.nbr
    u = x.astype(np.float16).astype(np.float32)  # what the shard stores
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    gram = u @ u.T
    np.fill_diagonal(gram, -np.inf)
    gram[:, 7] = -np.inf
    for r, i in enumerate(nb.idx.tolist()):
        best = np.argsort(-gram[i])[:5]
        assert nb.nbr[r].tolist() == best.tolist()
        np.testing.assert_allclose(nb.sim[r], gram[i, best], atol=1e-4)


def test_leaks_name_the_held_out_member_and_groups_keep_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    x[50] = x[3] + 0.01 * rng.normal(size=16)  # train 3 ~ test 50: a leak
    x[20] = x[10] * 1.5  # same direction, within train: a duplicate group
    x[21] = x[10] * 0.7
    y = np.zeros(60, np.int64)
    nb = neighbors.search(shards(tmp_path, x, y), range(60), range(60), k=4)
    where = {i: "test" if i >= 40 else "train" for i in range(60)}
    found = summary.pairs(nb, {"features": 0.99, "signatures": None}, None)
    assert {(a, b) for a, b, *_ in found} == {(3, 50), (10, 20), (10, 21), (20, 21)}
    dup = summary.duplicates(found, where, limit=10)
    assert dup["leaked"] == [50] and dup["leaks"][0]["twin"] == 3
    assert dup["within_split_groups"] == 1 and dup["redundant"] == [20, 21]
    # the page lists each pair once: the leak under leaks, the rest under duplicates
    from pipeline.reports.quality import section_html

    html = section_html({"quality": {"duplicates": dup}, "data": {"class_names": ["a"]}})
    assert html.count('id="leaks"') == 1 and html.count('id="duplicates"') == 1
    assert "Duplicates within a split (3 pair(s) in 1 group(s)" in html
    assert {(r["a"], r["b"]) for r in dup["within_pairs"]} == {(10, 20), (10, 21), (20, 21)}
    assert html.count("features cos") == 1 + 3  # one leak, three pairs within train
    assert summary.excluded({"duplicates": dup}, ("leaks", "duplicates")) == {
        "leaks": [50], "duplicates": [20, 21]}
    digests = np.zeros((60, 4), np.uint8)
    digests[:, 0] = np.arange(60)
    digests[33] = digests[44]  # same bytes, far apart in feature space is impossible, but
    exact = summary.pairs(nb, {"features": None}, digests)  # digests alone still find them
    assert [(a, b, how) for a, b, _, how in exact] == [(33, 44, "exact")]


def test_false_leak_rate_counts_distinct_same_class_pairs_and_qualifies_the_call() -> None:
    """Each training sample's nearest distinct same-class training neighbour: 10 of 100 are
    over the threshold (exact copies, other classes and held-out neighbours do not count)."""
    n, k = 120, 3
    labels_ = np.arange(n) % 2
    where = {i: "train" if i < 100 else "test" for i in range(n)}
    nbr = np.full((n, k), -1, np.int64)
    sim = np.full((n, k), -np.inf, np.float32)
    digests = np.zeros((n, 4), np.uint8)
    digests[:, 0], digests[:, 1] = np.arange(n) % 256, np.arange(n) // 256
    for i in range(100):
        other = 100 + (i % 20)  # a held-out neighbour first: skipped
        same = (i + 2) % 100  # the same class (i and i+2 have the same parity)
        nbr[i] = [other, same, (i + 1) % 100]
        sim[i] = [0.999, 0.99 if i < 10 else 0.5, 0.4]
    digests[2] = digests[0]  # 0's nearest same-class neighbour has 0's bytes: not distinct
    nb = neighbors.Neighbors(idx=np.arange(n), y=labels_, nbr=nbr, sim=sim,
                             nonfinite=np.zeros(0, np.int64))
    got = summary.false_leak_rate(nb, {"features": 0.95}, where, labels_, digests)
    assert got["pairs"] == 99 and got["rate"] == pytest.approx(9 / 99, abs=1e-4)
    section: dict[str, Any] = {"duplicates": {"false_leak": got, "leaked": list(range(5)),
                                              "leaks": [{"found_by": "features"}] * 5}}
    summary.qualify_leaks(section, held_out=20)  # ~1.8 expected by chance among 5 calls
    call = section["duplicates"]["leak_call"]
    assert not call["confident"] and call["expected_false"] == pytest.approx(1.8, abs=0.05)
    lines = quality_report.summary_lines({**section, "evaluation": {
        "leaked_test_samples": 5, "top1_all_test": 0.9, "top1_without_leaks": 0.8}}, [])
    assert any("not confident" in x for x in lines)
    assert not any(x.startswith("test top-1") for x in lines)
    section["duplicates"]["leaks"] = [{"found_by": "exact"}] * 5  # the same bytes: certain
    summary.qualify_leaks(section, held_out=20)
    assert section["duplicates"]["leak_call"]["confident"]


def test_natural_likeness_is_not_set_by_the_copies_inside_train() -> None:
    """The leak threshold from the data's own distinct same-class pairs: a robust fit of the
    bulk, so 5% real copies in train do not drag it up to the copies' similarity (an
    empirical 99.9th percentile would sit among them), and distinct pairs from the same
    distribution pass it about 0.1% of the time."""
    rng = np.random.default_rng(3)
    natural = 1.0 - np.exp(rng.normal(np.log(0.08), 0.35, size=4000))  # typical NN cosine
    copies = 1.0 - rng.uniform(1e-4, 2e-3, size=200)  # near copies: 0.998-0.9999
    t = summary.natural_likeness({"features": np.concatenate([natural, copies, [np.nan]])})
    clean = summary.natural_likeness({"features": natural})
    assert t["features"] == pytest.approx(clean["features"], abs=0.01)
    assert float(np.percentile(np.concatenate([natural, copies]), 99.9)) > 0.998
    assert t["features"] < 0.99 and (copies >= t["features"]).all()
    fresh = 1.0 - np.exp(rng.normal(np.log(0.08), 0.35, size=100_000))
    assert (fresh >= t["features"]).mean() < 0.004
    assert summary.natural_likeness({"features": natural[:5]}) == {}  # too few to fit


def test_outliers_are_the_samples_far_from_every_cluster(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(5, 32)) * 4
    y = np.repeat(np.arange(5), 60)
    x = (centers[y] + rng.normal(size=(300, 32))).astype(np.float32)
    far = rng.normal(size=(3, 32)).astype(np.float32) * 4  # three images from nowhere
    x = np.concatenate([x, far])
    y = np.concatenate([y, [0, 1, 2]])
    nb = neighbors.search(shards(tmp_path, x, y), range(303), range(303), k=10)
    out = summary.outliers(nb, 3.5, {}, y, limit=10)
    assert set(out["all"]) == {300, 301, 302}
    # the summary's numbers, computed here by brute force: 10 nearest others by cosine
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    np.fill_diagonal(cos, -np.inf)
    dist = 1.0 - np.sort(cos, axis=1)[:, -10:].mean(axis=1)
    assert out["checked"] == 303 and out["neighbours"] == 10
    assert out["median_distance"] == pytest.approx(float(np.median(dist)), abs=1e-4)
    from pipeline.reports.quality import summary_lines

    line = next(ln for ln in summary_lines({"outliers": out}, []) if ln.startswith("outliers"))
    assert line.startswith("outliers: 3 of 303 samples lie far from all their neighbours")
    assert f"the 10 nearest more than 3.5 robust standard deviations above the median, " \
        f"{np.median(dist):.3f}" in line
    small = tmp_path / "small"
    small.mkdir()
    few = neighbors.search(shards(small, x[:5], y[:5]), range(5), range(5), k=3)
    assert "too few" in summary.outliers(few, 3.5, {}, y, 10)["note"]


def test_label_issues_find_flipped_labels_with_the_true_one_suggested() -> None:
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(4, 32)) * 3
    y_true = np.repeat(np.arange(4), 100)
    x = (centers[y_true] + rng.normal(size=(400, 32))).astype(np.float32)
    y = y_true.copy()
    flipped = rng.permutation(400)[:16]
    y[flipped] = (y[flipped] + 1) % 4
    folds, note = labels.fold_of(y, 5, seed=0)
    assert note is None and set(folds.tolist()) == set(range(5))
    proba = np.zeros((400, 4), np.float32)
    for f in range(5):
        proba[folds == f] = labels.out_of_fold(x, y, folds, f, 4, 1e-2, 200)
    out = labels.label_issues(y, proba, np.arange(400), limit=50)
    found = set(out["all"])
    assert len(found & set(flipped.tolist())) >= 15 and len(found - set(flipped.tolist())) <= 2
    assert all(i["suggested"] == y_true[i["index"]] for i in out["issues"]
               if i["index"] in set(flipped.tolist()))
    single = labels.label_issues(np.zeros(10, np.int64), np.ones((10, 1), np.float32),
                                 np.arange(10), 5)
    assert "single class" in single["note"]
    fold, note = labels.fold_of(np.array([0, 0, 0, 1]), 5, 0)
    assert fold[3] == -1 and "single labeled sample" in str(note)


def test_out_of_fold_fits_stop_early_and_flag_what_converged_fits_flag() -> None:
    """The stage's probes stop at ``FOLD_TOLERANCE`` (loss change), not the job's 1e-9:
    fewer L-BFGS steps, the same flags and nearly the same probabilities as fits run to
    convergence (500 iterations at 1e-9), on overlapping classes where fits take long."""
    from pipeline.heads import linear

    rng = np.random.default_rng(5)
    y_true = np.repeat(np.arange(8), 90)
    x = (rng.normal(size=(8, 128))[y_true] + 1.2 * rng.normal(size=(720, 128))).astype(
        np.float32)
    y = y_true.copy()
    flipped = rng.permutation(720)[:30]
    y[flipped] = (y[flipped] + rng.integers(1, 8, 30)) % 8
    folds, _ = labels.fold_of(y, 5, seed=0)
    loose = np.zeros((720, 8), np.float32)
    tight = np.zeros((720, 8), np.float32)
    for f in range(5):
        loose[folds == f] = labels.out_of_fold(x, y, folds, f, 8, 1e-3, labels.FOLD_ITERS)
        train = (folds != f) & (folds >= 0)
        head = linear.fit_probe(x[train], y[train], 8, l2=1e-3, max_iter=500)
        tight[folds == f] = head.predict_proba(x[folds == f])
    assert not np.allclose(loose, tight, atol=1e-4)  # it did stop before convergence
    assert np.abs(loose - tight).max() < 0.1
    assert (loose.argmax(axis=1) == tight.argmax(axis=1)).mean() > 0.98
    a = set(labels.label_issues(y, loose, np.arange(720), limit=100)["all"])
    b = set(labels.label_issues(y, tight, np.arange(720), limit=100)["all"])
    assert len(b & set(flipped.tolist())) >= 20  # the converged fits find the flips...
    assert len(a ^ b) <= 2  # ...and the early-stopped ones flag the same samples


def _noisy(n: int, k: int, pi: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated predictions (the true class is drawn from them; a fifth of the samples
    ambiguous between two classes) and labels flipped at random at rate ``pi``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) + 6.0 * np.eye(k)[rng.integers(0, k, n)]
    amb = rng.random(n) < 0.2
    logits[amb] = 0.0
    logits[amb, rng.integers(0, k, int(amb.sum()))] = 3.0
    logits[amb, rng.integers(0, k, int(amb.sum()))] += 3.0
    q = np.exp(logits - logits.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    true = np.array([rng.choice(k, p=row) for row in q])
    y = true.copy()
    flip = rng.random(n) < pi
    y[flip] = (true[flip] + rng.integers(1, k, int(flip.sum()))) % k
    return q.astype(np.float32), y, flip


def test_the_noise_model_recovers_the_rate_and_its_precision_is_what_the_flags_show() -> None:
    """Against the truth of a simulation where the model holds: the fitted noise rate, and
    the flagged set's expected precision and recall, match the flips actually planted; on
    clean labels with ambiguous samples almost nothing is flagged."""
    q, y, flip = _noisy(4000, 10, 0.05, seed=3)
    m = labels.noise_model(y, q)
    assert abs(m["noise_rate"] - flip.mean()) < 0.015 and 0.7 <= m["temperature"] <= 1.4
    out = labels.label_issues(y, q, np.arange(len(y)), limit=10_000)
    got = np.asarray(out["all"])
    precision, recall = flip[got].mean(), flip[got].sum() / flip.sum()
    assert abs(out["expected_precision"] - precision) < 0.08  # measured: 0.761 vs 0.777
    assert abs(out["expected_recall"] - recall) < 0.1
    # the flags are exactly the labels more likely flipped than not under the fitted model,
    # surest first: Bayes' rule recomputed here from the reported T and pi
    t, pi = out["noise_model"]["temperature"], out["noise_model"]["noise_rate"]
    sharp = q.astype(np.float64) ** (1 / t)
    sharp /= sharp.sum(axis=1, keepdims=True)
    right = sharp[np.arange(len(y)), y]
    flip_p = pi * (1 - right) / 9 / (pi * (1 - right) / 9 + (1 - pi) * right)
    assert set(got.tolist()) == set(np.nonzero(flip_p >= 0.5)[0].tolist())
    conf = [r["confidence"] for r in out["issues"]]
    assert conf == sorted(conf, reverse=True)
    # confident learning, shown beside each flag, is cleanlab's own verdict
    from cleanlab.filter import find_label_issues
    cl = set(np.nonzero(find_label_issues(y, q, n_jobs=1))[0].tolist())
    assert all(r["confident_learning"] == (r["index"] in cl) for r in out["issues"])
    assert out["confident_learning"] == {"found": len(cl), "agrees": len(cl & set(got.tolist()))}
    assert all(0.5 <= r["confidence"] <= 1 for r in out["issues"])
    qc, yc, _ = _noisy(4000, 10, 0.0, seed=4)
    clean = labels.label_issues(yc, qc, np.arange(len(yc)), limit=10)
    assert clean["count"] <= 0.01 * len(yc) and clean["noise_model"]["noise_rate"] < 0.01


def test_neighbour_votes_combine_with_the_probe_as_a_weighted_geometric_mean() -> None:
    """Each sample's neighbour vote (labeled neighbours only, smoothed) and the probe's
    probabilities combine as their weighted, normalized geometric mean, recomputed here by
    hand; the weights are those that make the given labels most likely."""
    idx = np.array([10, 11, 12, 13])
    y = np.array([0, 1, 1, 2])
    nbr_idx = np.array([10, 11, 12, 13])
    nbr = np.array([[11, 12, 99], [12, 13, 10], [11, 10, 13], [-1, 99, 98]])  # 99: unlabeled
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]],
                     np.float32)
    votes = np.full((4, 3), 1 / 3)
    votes[0] = [0, 1, 0]  # sample 10: neighbours 11 and 12 are both class 1
    # 11: 12 -> 1, 13 -> 2, 10 -> 0; 12: 11 -> 1, 10 -> 0, 13 -> 2; 13: none labeled
    vote = 0.9 * votes + 0.1 / 3
    assert np.allclose(labels.vote(idx, y, nbr_idx, nbr, 3), vote)
    w = np.array([0.5, 1.5])
    want = proba ** 0.5 * vote ** 1.5
    want /= want.sum(axis=1, keepdims=True)
    assert np.allclose(labels.combine([proba, vote], w), want, atol=1e-6)
    # weights: a view that names the labels gets weight, one that does not gets about none
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 2000)
    good = np.full((2000, 4), 0.1)
    good[np.arange(2000), truth] = 0.7
    wrong = rng.random(2000) < 0.2  # the view is wrong about a fifth of them
    good[wrong] = 0.1
    good[wrong, (truth[wrong] + 1) % 4] = 0.7
    noise = rng.dirichlet(np.ones(4), 2000)
    fitted = labels.fit_weights([good, noise], truth)
    assert fitted[0] > 0.5 and fitted[1] < 0.1 * fitted[0], fitted
    nll = [-np.log(labels.combine([good, noise], v)[np.arange(2000), truth]).sum()
           for v in (fitted, fitted + np.array([0.1, 0]), fitted + np.array([-0.1, 0.05]),
                     np.ones(2))]
    assert nll[0] <= min(nll[1:]) + 1e-3  # the fit is the likelihood's optimum
    combined, views = labels.evidence(proba, idx, y, nbr_idx, {"feature neighbours": nbr})
    assert set(views) == {"probe", "feature neighbours"} and combined.shape == proba.shape
    assert views["probe"]["top1"] == 0.75  # 10, 11 and 13 right; 12 said 2


def test_learning_curve_nests_fits_and_says_when_it_cannot() -> None:
    y = np.repeat(np.arange(5), 40)
    small, big = curve.subset(y, 0.1, 3), curve.subset(y, 0.5, 3)
    assert set(small) <= set(big) and len(small) == 20 and len(curve.subset(y, 0.001, 3)) == 5
    pts = [{"per_class": n, "val_top1": 0.95 - 0.5 * n ** -0.7} for n in (1, 2, 5, 10, 20, 50)]
    fit = curve.fit(pts, [0.9, 0.99])
    assert abs(fit["plateau"] - 0.95) < 0.01 and fit["per_class_needed"]["0.99"] is None
    assert 5 <= fit["per_class_needed"]["0.9"] <= 40  # the law gives 0.9 at ~18 per class
    flat = curve.fit([{"per_class": n, "val_top1": 0.9} for n in (5, 10, 20, 40)], [0.95])
    assert flat["more_data_pays_off"] is False
    assert "at least 3" in curve.fit(pts[:2], [0.9])["note"]


def test_domain_classifier_sees_a_shift_and_balance_counts() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 8)).astype(np.float32)
    b = rng.normal(size=(300, 8)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    same = shift.domain_auc(a, y, b, y, seed=0)
    moved = shift.domain_auc(a, y, b + np.float32(1.0), y, seed=0)
    assert same["auc"] < 0.6 and same["shift"] == "none"
    assert moved["auc"] > 0.9 and moved["shift"] == "strong" and len(moved["per_class_auc"]) == 3
    assert "too few" in shift.domain_auc(a[:3], y[:3], b, y, seed=0)["note"]
    bal = shift.balance({"train": np.array([0] * 50 + [1] * 2), "test": np.array([0, 1])}, 3)
    assert bal["imbalance_ratio"] == 25 and bal["classes_without_training_samples"] == [2]
    # in words on the terminal and the page: no bare "AUC 0.98 (strong)"
    from pipeline.reports.quality import section_html, summary_lines

    names = ["cats", "dogs", "owls"]
    moved["most_shifted"] = [2]
    line = next(ln for ln in summary_lines({"shift": moved}, names)
                if ln.startswith("train vs test"))
    assert line.startswith(f"train vs test: a linear classifier tells test samples from "
                           f"training ones with AUC {moved['auc']:.3f} (0.5: no better than "
                           "chance, 1: always): a strong shift; the test set comes")
    assert line.endswith("; most shifted classes: owls")
    html = section_html({"quality": {"shift": moved}, "data": {"class_names": names}})
    assert line.removeprefix("train vs test: ") in html


def test_the_signature_is_named_for_the_kind_of_sample() -> None:
    """A text's signature is its wording, not a "thumbnail" (images, the default)."""
    from pipeline.reports.quality import summary_lines

    thr = {"near_duplicate_threshold": {"features": 0.9, "signatures": 0.85, "source": "x"}}
    text = summary_lines({**thr, "modality": "text"}, [])[0]
    assert "features ≥ 0.9, wording (character 3-grams) ≥ 0.85;" in text
    assert "thumbnail" not in text
    assert "spectrogram thumbnail ≥ 0.85" in summary_lines({**thr, "modality": "audio"}, [])[0]
    assert "features ≥ 0.9, thumbnail ≥ 0.85;" in summary_lines(thr, [])[0]


def test_calibration_keeps_copies_and_refuses_a_signal_that_cannot_tell() -> None:
    rng = np.random.default_rng(4)
    originals = rng.normal(size=(200, 64)).astype(np.float32)
    copies = np.concatenate([originals[:50] + 0.05 * rng.normal(size=(50, 64))
                             for _ in range(4)]).astype(np.float32)
    good, sims = calibrate(originals, copies, 50)
    assert good["threshold"] is not None and good["copy_recall"] >= 0.9 and len(sims) == 200
    blurry = np.concatenate([originals[:50] + 3.0 * rng.normal(size=(50, 64))
                             for _ in range(4)]).astype(np.float32)
    bad, _ = calibrate(originals, blurry, 50)
    assert bad["threshold"] is None and "cannot tell" in bad["why_unused"]
    assert "not measured" in familiarity(None, originals, None)["note"]


def test_the_probe_reads_what_extraction_stored_and_runs_the_backbone_on_copies_only() -> None:
    """The backbone half (:func:`embed_copies`, sent beside extraction) embeds copies only;
    calibrated on the stored features and signatures of the sampled images, the thresholds
    and domain verdict match the probe that computes everything itself."""
    from pipeline.backbones import resolve_weights
    from pipeline.devices import cached_backbone
    from pipeline.preprocess import preprocess, signatures
    from pipeline.quality.probing import PIXEL_COPIES, embed, probe_backbone
    from pipeline.sources.arrays import ArraySource

    images, y, names = photo_set(48, 20)
    src = ArraySource(images, y, names)
    w = resolve_weights("efficientnet_lite0", None)
    bb = cached_backbone("efficientnet_lite0", None, "cpu")
    pre = w.preprocessing.scaled_to(48)
    asked: list[list[int]] = []

    def stored(ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        asked.append(ids)
        with torch.inference_mode():
            x = preprocess([images[i] for i in ids], pre, "cpu")
            return np.asarray(ids), bb.model(x).numpy(), signatures(x)

    ids = list(range(len(y)))
    args = (src, ids, "efficientnet_lite0", None, pre, "cpu", "fp32", 0)
    alone = probe_backbone(*args, n_calibrate=32, n_sample=160, n_pixel=64)
    read = probe_backbone(*args, n_calibrate=32, n_sample=160, stored=stored, n_pixel=64)
    assert len(asked) == 1 and len(asked[0]) == 160
    assert alone["sampled"] == read["sampled"] == read["read_from_store"] == 160
    assert read["calibrated_on"] == alone["calibrated_on"] == 64
    # PIXEL_COPIES copies of each original; only one copy of each of the first 32 costs a
    # forward pass, the others give the pixel signals (signatures, fine detail) their
    # percentiles' extra copies
    assert read["copies"] == 64 * PIXEL_COPIES and read["copies_through_backbone"] == 32
    with_model = embed(bb.model, images[:8], pre, "cpu", "fp32")
    pixels_only = embed(None, images[:8], pre, "cpu", "fp32")
    assert pixels_only[0].shape == (8, 0) and with_model[0].shape[0] == 8
    assert np.array_equal(pixels_only[1], with_model[1])
    assert np.array_equal(pixels_only[2], with_model[2])
    for signal in ("features", "signatures"):  # the same calibration, to float noise
        a, b = alone[signal], read[signal]
        for stat in ("copy_similarity", "nearest_other_similarity"):
            for q in ("p5", "median", "p95"):
                assert abs(a[stat][q] - b[stat][q]) < 0.02, (signal, stat, q)
        if a["threshold"] is not None and b["threshold"] is not None:
            assert abs(a["threshold"] - b["threshold"]) < 0.02
        # (a signal at the edge of "cannot tell copies apart" may be used by one and not
        # the other: measured on CI, features at 48 px, threshold 0.994 vs unused)
    assert read["familiarity"]["domain"] == alone["familiarity"]["domain"]


def test_calibration_from_stored_features_without_signatures_uses_features_only() -> None:
    """Shards without signatures (an older version): the features are calibrated, the
    signature signal is reported unused, never calibrated on empty vectors; an original
    extraction skipped is dropped with its copies."""
    from pipeline.quality.probing import calibrate_copies

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(100, 16)).astype(np.float32)
    originals = np.arange(10, 30)  # 20 calibrated originals, 2 copies each (round-major)
    copies = np.concatenate([feats[originals] + 0.01 * rng.normal(size=(20, 16))
                             for _ in range(2)]).astype(np.float32)
    arrays = {"picked": np.arange(100), "originals": originals, "copy_features": copies,
              "copy_signatures": np.zeros((40, 4), np.float32)}
    kept = np.setdiff1d(np.arange(100), [12])  # extraction skipped sample 12

    def stored(ids: list[int]) -> tuple[np.ndarray, np.ndarray, None]:
        return kept, feats[kept], None

    out = calibrate_copies(arrays, stored)
    assert out["calibrated_on"] == 19 and out["copies"] == 38 and out["sampled"] == 99
    assert out["features"]["threshold"] is not None and out["copy_recall"] >= 0.9
    assert out["signatures"]["threshold"] is None
    assert "no signatures" in out["signatures"]["why_unused"]


def test_planted_problems_are_where_plant_says() -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, (100, 24, 24, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 25)
    p = planted.plant(images, y, 4, seed=0, exact=5, near=10, flip_fraction=0.05,
                      ood_images=planted.photo_crops(3, 24))
    assert len(p.images) == len(p.labels) == 118 and p.ood == [115, 116, 117]
    assert all((p.images[a] == p.images[b]).all() for a, b in p.exact)
    assert all(not (p.images[a] == p.images[b]).all() for a, b in p.near)
    assert len(p.flipped) == 5 and all(p.labels[i] != p.true_labels[i] for i in p.flipped)
    assert near_copy(images[0], rng).shape == images[0].shape
    with pytest.raises(ValueError, match="at most"):
        planted.plant(images, y, 4, exact=40, near=40)


def photo_set(side: int, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.quality_planted import photos

    return photos(side, per_class)


@pytest.mark.integration
def test_quality_job_finds_planted_problems_and_exclude_drops_leaks(
        cluster: Any, tmp_path: Path) -> None:
    """``featurefleet quality`` on photo crops with planted problems (real workers, real
    ImageNet weights), then a probe job with ``quality.exclude: [leaks]``."""
    from pipeline import submit
    from pipeline.plan import read_plan
    from pipeline.spec import JobSpec

    images, y, names = photo_set(96, 50)
    noise = np.random.default_rng(6).integers(0, 255, (4, 96, 96, 3), dtype=np.uint8)
    blank = np.stack([np.full((96, 96, 3), v, np.uint8) for v in (0, 255)])
    p = planted.plant(images, y, len(names), seed=0, exact=10, near=30, flip_fraction=0.04,
                      ood_images=np.concatenate([blank, noise]))
    data = tmp_path / "planted.npz"
    np.savez(data, images=p.images, labels=p.labels, class_names=np.asarray(names))
    spec = {"name": "planted", "data": {"source": "npz", "path": str(data), "shard_size": 256},
            "backbone": {"name": "efficientnet_lite0", "image_size": 96},
            "quality": {"curve_fractions": [0.1, 0.3, 1.0]},
            "output": str(tmp_path / "out"), "store": str(tmp_path / "store")}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    env_cmd = [sys.executable, "-m", "pipeline", "quality", str(job_file), "--wait",
               "--broker", cluster.broker, "--timeout", "600"]
    run = subprocess.run(env_cmd, capture_output=True, text=True, timeout=700)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "duplicates:" in run.stdout and "label issues:" in run.stdout
    job_id = run.stdout.split()[0]
    job_dir = tmp_path / "out" / "jobs" / job_id
    section = json.loads((job_dir / "quality.json").read_text())
    plan = read_plan(job_dir)
    where = {int(i): n for n in ("train", "val", "test") for i in plan.splits.of(n)}
    got = planted.score(p, section, where)
    assert got["cross_split_pairs"] >= 10
    # crops of one photo per class are alike by nature; the benchmark has the full numbers
    assert got["cross_split_recall"] >= 0.8, got
    assert got["precision_at_recall_0.5"] is not None and got["precision_at_recall_0.5"] >= 0.8
    assert got["outliers_flagged"] == section["outliers"]["count"] == len(
        section["outliers"]["all"])  # (how many planted ones: benchmarks/quality_planted.py)
    lc = section["learning_curve"]
    assert [pt["fraction"] for pt in lc["points"]] == [0.1, 0.3, 1.0]
    assert section["pretraining_domain"]["domain"] in ("near", "moderate")
    # images: the crop-aligned signal is calibrated too (never below the plain signature: the
    # identity is one of its crops); the label evidence says what each view weighed
    cal = section["near_duplicate_threshold"]["calibration"]
    assert cal["aligned"]["copy_similarity"]["p5"] >= cal["signatures"]["copy_similarity"]["p5"]
    # and the fine detail: extraction stored each image's 64 x 64 picture beside its features
    # (one per row), and the calibration tells the copies from distinct crops by it
    import h5py

    for shard in plan.shards:
        with h5py.File(shard.path, "r") as f:
            assert f["details"].shape == (f["features"].shape[0], 64 * 64)
            assert f["details"].dtype == np.uint8
    assert cal["detail"]["copy_similarity"]["p5"] > cal["detail"]["nearest_other_similarity"][
        "median"]
    nb_tables = np.load(next((tmp_path / "out").rglob("neighbors-0.npz")))
    assert "dt_sim" in nb_tables.files
    ev = section["label_issues"]["evidence"]
    assert set(ev) == {"probe", "feature neighbours", "signature neighbours"}
    assert sum(v["weight"] for v in ev.values()) > 0
    html = (job_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and 'id="learning-curve"' in html
    # the same job again: the features are cached and the stage's content-addressed result
    # is reused (no part runs), with the same findings
    again = subprocess.run(env_cmd, capture_output=True, text=True, timeout=700)
    assert again.returncode == 0, again.stderr[-2000:]
    job2 = tmp_path / "out" / "jobs" / again.stdout.split()[0]
    assert read_plan(job2).quality.parts() == []  # type: ignore[union-attr]
    reused = json.loads((job2 / "quality.json").read_text())
    assert reused["reused"]["seconds_then"] == section["seconds"] and reused["seconds"] == 0
    for part in ("duplicates", "label_issues", "outliers", "learning_curve", "shift"):
        assert reused[part] == section[part], part
    assert json.loads((job2 / "report.json").read_text())["timings"]["quality_reused"]
    # every finding exported for review: one row per finding, sample ids the data's own
    export = tmp_path / "review.csv"
    out = subprocess.run([sys.executable, "-m", "pipeline", "quality", job_id, "--export",
                          str(export), "--broker", cluster.broker], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import csv

    rows = list(csv.DictReader(export.read_text().splitlines()))
    by = {f: [r for r in rows if r["finding"] == f] for f in
          ("leak", "label_issue", "outlier", "duplicate")}
    assert len(by["leak"]) == len(section["duplicates"]["leaked"])
    assert len(by["outlier"]) == section["outliers"]["count"]
    li = section["label_issues"]
    assert len(by["label_issue"]) == (0 if li.get("withheld") else li["count"])
    assert len(by["duplicate"]) == len(section["duplicates"]["redundant"])
    assert all(r["sample_id"] and r["score_means"] for r in rows)
    assert all(r["twin_id"] and r["twin_split"] != r["split"] for r in by["leak"])
    assert all(r["suggested_label"] in names and r["suggested_label"] != r["given_label"]
               for r in by["label_issue"])
    if by["label_issue"]:  # the summary's expected precision is the flags' mean confidence
        scores = [float(r["score"]) for r in by["label_issue"]]
        assert all(0.5 <= v <= 1 for v in scores)
        assert abs(float(np.mean(scores)) - li["expected_precision"]) < 2e-3
        assert f"about {li['expected_precision']:.0%} of the flags" in run.stdout
    assert 'href="flagged.csv"' in html

    leaked = section["duplicates"]["leaked"]
    assert leaked, "the planted cross-split copies leak into val/test"
    probe = submit(JobSpec.from_dict({**spec, "name": "planted-probe", "kind": "classify",
                                      "probe": {"l2": 1e-3},
                                      "quality": {"exclude": ["leaks"],
                                                  "curve_fractions": [1.0]}}),
                   broker=cluster.broker)
    st = probe.wait(timeout=600)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = probe.result()
    ev = rep["quality"]["evaluation"]
    test_leaks = [i for i in rep["quality"]["duplicates"]["leaked"] if where.get(i) == "test"]
    assert ev["leaked_test_samples"] == len(test_leaks)
    assert ev["excluded_test_samples"] == len(test_leaks)
    assert rep["metrics"]["top1"] == pytest.approx(ev["top1_evaluated"], abs=1e-5)
    assert ev["top1_evaluated"] == ev["top1_without_leaks"]


def test_a_reviewed_exclude_file_leaves_its_samples_out_at_planning(tmp_path: Path) -> None:
    """``quality.exclude_file``: the export's CSV (sample_id column) or one id per line;
    unknown ids are a warning, a CSV without sample_id an error naming the fix."""
    from pipeline.errors import DataError
    from pipeline.planner import make_plan
    from pipeline.sources import open_source
    from pipeline.spec import JobSpec

    base = {"name": "x", "data": {"source": "digits", "limit": 200},
            "output": str(tmp_path / "out")}
    source = open_source(JobSpec.from_dict(base).data)
    chosen = [source.sample_id(i) for i in (3, 17, 1500)]
    review = tmp_path / "review.csv"
    review.write_text("sample_id,finding\n" + "".join(f"{i},leak\n" for i in chosen)
                      + "no-such-sample,leak\n")
    spec = JobSpec.from_dict({**base, "quality": {"exclude_file": str(review)}})
    plan = make_plan(spec, "0123456789ab")
    reviewed = [e for e in plan.excluded if e.kind == "reviewed"]
    assert [e.index for e in reviewed] == [3, 17, 1500]
    assert not {3, 17, 1500} & set(plan.extract_ids)
    assert any("no-such-sample" in w for w in plan.warnings)
    lines = tmp_path / "ids.txt"
    lines.write_text(f"{chosen[0]}\n\n")
    plan = make_plan(spec.replace(quality={"exclude_file": str(lines)}), "0123456789ab")
    assert [e.index for e in plan.excluded if e.kind == "reviewed"] == [3]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,finding\nx,leak\n")
    with pytest.raises(DataError, match="no sample_id column"):
        make_plan(spec.replace(quality={"exclude_file": str(bad)}), "0123456789ab")
    with pytest.raises(DataError, match="cannot be read"):
        make_plan(spec.replace(quality={"exclude_file": str(tmp_path / "nope.csv")}),
                  "0123456789ab")


def test_on_by_default_off_by_switch_and_bad_settings_named(tmp_path: Path) -> None:
    from pipeline.errors import SpecError
    from pipeline.planner import make_plan
    from pipeline.spec import JobSpec

    base = {"data": {"source": "digits", "limit": 200}, "output": str(tmp_path)}
    plan = make_plan(JobSpec.from_dict(base), "00000000000a")
    assert plan.quality is not None and "probe" in plan.quality.parts()
    assert sum(p.startswith("fold.") for p in plan.quality.parts()) == 5
    off = make_plan(JobSpec.from_dict({**base, "quality": {"enabled": False}}), "00000000000b")
    assert off.quality is None
    with pytest.raises(SpecError, match=r"quality\.exclude.*leaks"):
        JobSpec.from_dict({**base, "quality": {"exclude": ["typos"]}})
    with pytest.raises(SpecError, match=r"quality\.curve_fractions"):
        JobSpec.from_dict({**base, "quality": {"curve_fractions": [0.0, 1.0]}})


def test_a_section_made_of_notes_still_renders_and_summarizes() -> None:
    """Tiny data: every part a note (or nothing found) -> a page and a summary, no error."""
    from pipeline.reports.quality import section_html, summary_lines

    notes: dict[str, Any] = {
        "near_duplicate_threshold": {"features": None, "signatures": None, "source": "default"},
        "duplicates": summary.duplicates([], {}, 10), "removed_at_planning": [],
        "outliers": {"note": "5 samples are too few to call any of them an outlier"},
        "label_issues": {"count": 0, "checked": 16, "issues": [], "all": [], "oof_top1": 0.5},
        "learning_curve": {"note": "2 distinct training-set sizes: a curve needs at least 3"},
        "shift": {"note": "3 training and 2 test samples are too few"},
        "balance": shift.balance({"train": np.array([0, 1])}, 2),
        "pretraining_domain": {"note": None}, "nonfinite": {"count": 0, "indices": []},
        "excluded": {}}
    for section in (notes, {**notes, "label_issues": {"note": "a single class"}},
                    {"duplicates": {}}):
        html = section_html({"quality": section, "data": {"class_names": ["a", "b"]}})
        assert html.startswith('<section id="quality">') and "Data quality" in html
        assert summary_lines(section, ["a", "b"])
    assert section_html({"quality": {}}) == ""  # no stage, no section


def test_learning_curve_answers_stay_within_what_was_measured() -> None:
    """Fractions that give the same samples are one point; an answer agrees with the table
    (never below a measured size that fell short); no extrapolation past 4x the largest
    size; 'still paying off' only when the last gain exceeds the validation noise."""
    pts = [{"fraction": f, "samples": s, "per_class": s / 10, "val_top1": v}
           for f, s, v in [(0.01, 10, 0.5), (0.02, 10, 0.5), (0.05, 10, 0.5), (0.1, 40, 0.889),
                           (0.2, 80, 0.93), (0.5, 200, 0.95), (1.0, 400, 0.955)]]
    assert [p["samples"] for p in curve.merged(pts)] == [10, 40, 80, 200, 400]
    fit = curve.fit(pts, [0.9, 0.99], val_samples=100)
    assert 5 <= fit["per_class_needed"]["0.9"] <= 8  # 4/class gave 0.889, 8/class 0.93
    assert fit["per_class_needed"]["0.99"] is None
    assert "not reached within the measured range" in fit["per_class_needed_how"]["0.99"] or \
        fit["per_class_needed_how"]["0.99"] == "above the fitted plateau"
    # +0.5 points on 100 validation samples is noise (2 SE ~ 4 points): not "paying off"
    assert fit["more_data_pays_off"] is False and "no measurable gain" in fit["advice"]
    ceiling = curve.fit([{"per_class": n, "val_top1": v} for n, v in
                         [(1, 0.6), (2, 0.8), (5, 1.0), (10, 1.0)]], [0.9], val_samples=50)
    assert ceiling["more_data_pays_off"] is False and "ceiling" in ceiling["advice"]


def test_findings_agree_with_what_the_job_measured() -> None:
    from pipeline.quality import summary

    weak = {"label_issues": {"count": 55, "checked": 120, "oof_top1": 0.508},
            "pretraining_domain": {"domain": "far", "advice": "expect frozen features to "
                                   "underperform"},
            "learning_curve": {"points": [{"per_class": 9, "val_top1": 0.5}]}}
    summary.qualify(weak, "IMAGENET1K_V1")
    assert weak["label_issues"]["withheld"] and "not counted" in weak["label_issues"]["note"]
    strong = {"label_issues": {"count": 1, "checked": 500, "oof_top1": 0.96},
              "pretraining_domain": {"domain": "far", "advice": "expect frozen features to "
                                     "underperform"}}
    summary.qualify(strong, "IMAGENET1K_V1")
    assert "already reach 0.960" in strong["pretraining_domain"]["advice"]
    assert "underperform" not in strong["pretraining_domain"]["advice"]
    assert not strong["label_issues"].get("withheld")
    own = {"pretraining_domain": {"domain": "far", "advice": "pretrain an encoder"}}
    summary.qualify(own, "job:0123456789ab")
    assert own["pretraining_domain"]["domain"] == "own"
    assert "pretrain an encoder" not in own["pretraining_domain"]["advice"]
    told = {"pretraining_domain": {"domain": "far", "advice": "pretrain an encoder"}}
    summary.qualify(told, "job:0123456789ab", {"summary": "yes: +0.19 over ImageNet"})
    assert told["pretraining_domain"]["advice"].endswith(
        "did its pretraining help? yes: +0.19 over ImageNet")


def test_the_leak_call_reads_the_fitted_rate_not_the_copies_inside_train() -> None:
    """5% real near copies inside train make the counted rate of distinct-looking pairs over
    the threshold about 5%; the fit to their bulk says what natural likeness alone passes
    (checked against the normal's tail, computed here), and 30 near-copy leaks among 600
    held-out samples are then a confident call."""
    from math import erf, log, sqrt

    rng = np.random.default_rng(4)
    natural = 1.0 - np.exp(rng.normal(np.log(0.08), 0.35, size=1900))
    best = {"features": np.concatenate([natural, 1.0 - rng.uniform(1e-4, 2e-3, size=100)])}
    t = summary.natural_likeness(best)["features"]
    x = np.log(1.0 - best["features"])
    mu, sd = np.median(x), 1.4826 * np.median(np.abs(x - np.median(x)))
    want = 0.5 * (1 + erf((log(1 - t) - mu) / sd / sqrt(2)))
    got = summary.fitted_rate(best, {"features": t, "signatures": None})
    assert got == pytest.approx(want, rel=1e-6) and got == pytest.approx(0.001, abs=2e-4)
    counted = float((best["features"] >= t).mean())
    assert counted > 0.04
    section: dict[str, Any] = {"duplicates": {
        "false_leak": {"rate": counted, "fitted_rate": got}, "leaked": list(range(30)),
        "leaks": [{"found_by": "aligned"}] * 30}}
    summary.qualify_leaks(section, held_out=600)
    call = section["duplicates"]["leak_call"]
    assert call["confident"] and call["expected_false"] == pytest.approx(600 * got, abs=0.05)
    assert f"counted, {counted:.1%}" in call["note"]
    flat = {"features": np.full(40, 0.5)}  # no spread: no fit, the counted rate stands
    assert summary.fitted_rate(flat, {"features": 0.9}) is None


def test_the_curve_table_rounds_as_the_summary_does() -> None:
    from pipeline.reports.quality import section_html

    pts = [{"fraction": 0.1, "samples": 132, "per_class": 11.0, "val_top1": 0.654761},
           {"fraction": 0.5, "samples": 670, "per_class": 55.8, "val_top1": 0.7023809}]
    html = section_html({"quality": {"learning_curve": {"points": pts, "fit": {}}},
                         "data": {"class_names": ["a"]}})
    assert "<td>132</td><td>11</td><td>0.655</td>" in html
    assert "<td>670</td><td>55.8</td><td>0.702</td>" in html and "0.65476" not in html
