"""The job side of the data-quality stage: each part as a task step, and the summary.

Parts (one task each, recorded once in ``ff:job:<id>:quality``; bulky results as files under
``<job>/quality/``): ``neighbors.<b>`` (a block of query rows against every shard),
``fold.<f>`` (out-of-fold probe predictions), ``curve.<i>`` (a learning-curve point),
``shift`` (train-vs-test domain classifier), ``probe`` (GPU queue: copies through the
backbone, the thresholds calibrated on them against the stored features of the probe's
sample, and familiarity). ``finish`` combines them into ``<job>/quality.json`` (and what
``quality.exclude`` leaves out) and, for ``kind: quality``, writes the report."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import train
from pipeline.devices import pick_device
from pipeline.errors import JobError, NotReady, StoreError
from pipeline.fsio import atomic_path, atomic_write_text
from pipeline.jobs.records import JobStore
from pipeline.jobs.steps import live, plan_source, shard_paths, shard_results, succeed
from pipeline.plan import Plan, PlanMessage, QualityPlan, load_plan
from pipeline.quality import curve, labels, neighbors, probing, shift, standout, summary
from pipeline.reports import quality as quality_report
from pipeline.reports import report
from pipeline.store import files
from pipeline.store.shards import ShardReader

FALLBACK_THRESHOLD = 0.98  # near-duplicate similarity when calibration was impossible
SHIFT_ROWS = 20000  # samples per side for the domain classifier


def _q(plan: Plan) -> QualityPlan:
    if plan.quality is None:
        raise JobError(f"job {plan.job_id} has no quality stage in its plan")
    return plan.quality


def _dir(plan: Plan) -> Path:
    return plan.job_dir / "quality"


def _record(jobs: JobStore, plan: Plan, part: str, t0: float, **result: Any) -> dict[str, Any]:
    out = {"part": part, "seconds": round(time.perf_counter() - t0, 3), **result}
    jobs.record_part(plan.job_id, "quality", part, out)
    return out


def run_neighbors(jobs: JobStore, ref: PlanMessage, block: int) -> dict[str, Any]:
    """Nearest neighbours of one block of samples among all of them."""
    plan = load_plan(ref)
    q = _q(plan)
    if not 0 <= int(block) < len(q.blocks):
        raise JobError(f"job {plan.job_id} has no quality block {block!r}")
    live(jobs, plan, "quality")
    t0 = time.perf_counter()
    start, end = q.blocks[int(block)]
    ids = plan.extract_ids
    paths, k = shard_paths(jobs, plan), plan.spec.quality.neighbors
    nb = neighbors.search(paths, ids[start:end], ids, k)
    with contextlib.suppress(StoreError):  # shards written before schema 3 have no signatures
        nb = nb.with_signatures(neighbors.search(paths, ids[start:end], ids, k,
                                                 field="signatures"))
        if plan.backbone.preprocessing.get("modality", "image") == "image":
            nb = nb.with_aligned(paths)
    with contextlib.suppress(StoreError):  # shards written before schema 4 have no pictures
        if nb.al_nbr is not None:
            nb = nb.with_detail(paths)
    neighbors.save(nb, str(_dir(plan) / f"neighbors-{int(block)}.npz"))
    return _record(jobs, plan, f"neighbors.{int(block)}", t0, rows=len(nb.idx))


SMALL_FIT = 6_000_000  # rows x dim below which one thread fits a probe faster than two


@contextlib.contextmanager
def fit_threads(rows: int, dim: int) -> Any:
    """One torch thread for a small probe fit (measured: 1,437 x 1,280, five folds: 1.3 s on
    one thread, 1.6 s on two, and far worse beside another busy process), every core for
    a large one (10,000 x 1,280: 0.29 s on two, 0.42 s on one)."""
    import torch

    before = torch.get_num_threads()
    if rows * dim < SMALL_FIT:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finite_rows(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Which rows are all finite (checked in chunks: no temporary as large as ``x``)."""
    ok = np.ones(len(x), bool)
    for s in range(0, len(x), chunk):
        ok[s:s + chunk] = np.isfinite(x[s:s + chunk]).all(axis=1)
    return ok


def _labeled(jobs: JobStore, plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # float16, as stored: half the memory of the widest task (100k x 1280: 256 MB)
    return ShardReader(shard_paths(jobs, plan), np.asarray(plan.extract_ids)).read(np.float16)


def run_fold(jobs: JobStore, ref: PlanMessage, fold: int) -> dict[str, Any]:
    """Out-of-fold probe probabilities of one fold of every labeled sample."""
    plan = load_plan(ref)
    q = _q(plan)
    live(jobs, plan, "quality")
    t0 = time.perf_counter()
    x, y, idx = _labeled(jobs, plan)
    ok = finite_rows(x)
    if not ok.all():  # (no copy of the whole table when every row is finite)
        x, y, idx = x[ok], y[ok], idx[ok]
    folds, _note = labels.fold_of(y, q.folds, plan.spec.data.seed)
    mine = folds == int(fold)
    proba = np.zeros((0, len(plan.class_names)), np.float32)
    if len(np.unique(y)) >= 2 and mine.any():
        with fit_threads(*x.shape):
            proba = labels.out_of_fold(x, y, folds, int(fold), len(plan.class_names), q.l2,
                                       min(plan.spec.probe.max_iter, labels.FOLD_ITERS))
    with atomic_path(_dir(plan) / f"fold-{int(fold)}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, idx=idx[mine], y=y[mine], proba=proba)
    return _record(jobs, plan, f"fold.{int(fold)}", t0, rows=int(mine.sum()))


def run_curve(jobs: JobStore, ref: PlanMessage, index: int) -> dict[str, Any]:
    """One learning-curve point: the probe on a fraction of train, scored on val."""
    plan = load_plan(ref)
    q = _q(plan)
    live(jobs, plan, "quality")
    t0 = time.perf_counter()
    fraction = q.fractions[int(index)]
    feats = train.read_splits(shard_paths(jobs, plan), {"train": plan.splits.train,
                                                        "val": plan.splits.val}, np.float16)
    tr, va = feats["train"], feats["val"]
    tr_ok, va_ok = finite_rows(tr.x), finite_rows(va.x)
    if len(np.unique(tr.y[tr_ok])) < 2 or not va_ok.any():
        return _record(jobs, plan, f"curve.{int(index)}", t0, fraction=fraction,
                       note="needs two classes in train and a validation split")
    tr_x = tr.x if tr_ok.all() else tr.x[tr_ok]  # copy only when some rows are not finite
    with fit_threads(*tr_x.shape):
        pt = curve.point(tr_x, tr.y[tr_ok], va.x[va_ok], va.y[va_ok],
                         len(plan.class_names), fraction, plan.spec.data.seed, q.l2,
                         min(plan.spec.probe.max_iter, labels.FOLD_ITERS), labels.FOLD_TOLERANCE)
    return _record(jobs, plan, f"curve.{int(index)}", t0, **pt)


def run_shift(jobs: JobStore, ref: PlanMessage) -> dict[str, Any]:
    """The train-vs-test domain classifier (at most SHIFT_ROWS samples per side)."""
    plan = load_plan(ref)
    live(jobs, plan, "quality")
    t0 = time.perf_counter()
    rng = np.random.default_rng(plan.spec.data.seed)
    pick = {name: sorted(rng.permutation(np.asarray(plan.splits.of(name), np.int64))
                         [:SHIFT_ROWS].tolist()) for name in ("train", "test")}
    feats = train.read_splits(shard_paths(jobs, plan), pick)
    tr, te = feats["train"], feats["test"]
    tr_ok, te_ok = np.isfinite(tr.x).all(axis=1), np.isfinite(te.x).all(axis=1)
    with fit_threads(len(tr.x) + len(te.x), tr.x.shape[-1]):
        result = shift.domain_auc(tr.x[tr_ok], tr.y[tr_ok], te.x[te_ok], te.y[te_ok],
                                  plan.spec.data.seed, max_rows=SHIFT_ROWS)
    return _record(jobs, plan, "shift", t0, **result)


def run_probe(jobs: JobStore, ref: PlanMessage) -> dict[str, Any]:
    """With the backbone (GPU queue): copies of sampled images, and the near-duplicate
    thresholds calibrated on them against the stored features (the part runs after
    extraction: calibrating here keeps it off the stage's last step), and how familiar the
    images look to the pretrained network."""
    plan = load_plan(ref)
    live(jobs, plan, "quality")
    t0 = time.perf_counter()
    from pipeline.backbones import preprocessing_from_dict
    from pipeline.extract import decode_min_side

    bb = plan.backbone
    pre = preprocessing_from_dict(bb.preprocessing)
    record, arrays = probing.embed_copies(
        plan_source(plan), plan.splits.train or plan.extract_ids, bb.name, bb.weights,
        pre, pick_device(plan.spec.backbone.device), bb.precision, plan.spec.data.seed,
        min_size=decode_min_side(pre, plan.spec.backbone.decode))
    if arrays:
        record.update(_calibrated(shard_paths(jobs, plan), arrays))
    return _record(jobs, plan, "probe", t0, **record)


def _calibrated(paths: list[str], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The thresholds calibrated on the probe's copies and the stored features of its
    sampled images (``paths``: the job's shards)."""

    def stored(ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """What extraction wrote for ``ids``: indices, features, signatures (same order;
        None for shards of an older version, without signatures: features only)."""
        x, _, idx = ShardReader(paths, np.asarray(ids, np.int64)).read()
        try:
            s, _, sidx = ShardReader(paths, np.asarray(ids, np.int64), "signatures").read()
        except StoreError:
            return idx, x, None
        return (idx, x, s) if np.array_equal(idx, sidx) else None

    def stored_details(ids: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The pictures extraction wrote for ``ids`` (None: shards without them)."""
        try:
            d, _, didx = ShardReader(paths, np.asarray(ids, np.int64), "details").read(np.uint8)
        except StoreError:
            return None
        return didx, d

    return probing.calibrate_copies(arrays, stored, stored_details)


def run_part(jobs: JobStore, ref: PlanMessage, part: str) -> dict[str, Any]:
    """Run the part a message names (``neighbors.3``, ``fold.0``, ``curve.2``, ``shift``,
    ``probe``)."""
    kind, _, index = str(part).partition(".")
    if kind in ("neighbors", "fold", "curve") and index.isdigit():
        step = {"neighbors": run_neighbors, "fold": run_fold, "curve": run_curve}[kind]
        return step(jobs, ref, int(index))
    if kind in ("shift", "probe") and not index:
        return (run_shift if kind == "shift" else run_probe)(jobs, ref)
    raise JobError(f"no quality part {str(part)[:40]!r}; fix: this message was not sent by "
                   "featurefleet")


def run_finish(jobs: JobStore, ref: PlanMessage) -> dict[str, Any]:
    """Combine the parts into ``quality.json``; for ``kind: quality``, the report too.

    Raises:
        NotReady: the chord body ran before every part was recorded (retried).
    """
    plan = load_plan(ref)
    q = _q(plan)
    live(jobs, plan, "quality")
    t0 = time.perf_counter()
    parts = jobs.parts(plan.job_id, "quality")
    missing = [p for p in q.parts() if p not in parts]
    if missing:
        raise NotReady(f"job {plan.job_id}: quality parts {missing[:5]} not recorded yet")
    if q.cached:
        section = _reused(plan, q)
    else:
        section = summarize(jobs, plan, parts)
        section["seconds"] = round(time.perf_counter() - t0 + sum(
            float(p.get("seconds", 0)) for p in parts.values()), 3)
        if q.cache_path:  # content-addressed: the next job on these features reuses it
            with contextlib.suppress(StoreError, OSError):
                files.write_text(q.cache_path, json.dumps({**section, "key": q.key}))
    section["excluded"] = summary.excluded(section, plan.spec.quality.exclude)
    source = plan_source(plan)
    section["sample_ids"] = {str(i): source.sample_id(int(i))
                             for i in quality_report.shown(section)}
    quality_report.write_flagged(plan.job_dir / "flagged.csv", section.get("flagged", []),
                                 source.sample_id, plan.class_names,
                                 summary.split_of({n: plan.splits.of(n)
                                                   for n in ("train", "val", "test")}))
    thumbs = quality_report.thumbnails(source, quality_report.shown(section))
    atomic_write_text(_dir(plan) / "thumbnails.json", json.dumps(thumbs))
    section["thumbnails"] = str(_dir(plan) / "thumbnails.json")
    atomic_write_text(plan.job_dir / "quality.json", json.dumps(section, indent=1))
    jobs.update(plan.job_id, quality=json.dumps(quality_report.brief(section)),
                quality_s=section["seconds"], quality_reused=bool(q.cached))
    if plan.kind != "quality":
        return {"quality": str(plan.job_dir / "quality.json")}
    rep = quality_report.build(plan, jobs.get(plan.job_id),
                               report.shard_rows(plan, shard_results(jobs, plan)), section)
    path = report.write_report(rep, plan.job_dir)
    return succeed(jobs, plan, path, {"top1": section.get("label_issues", {}).get("oof_top1")})


def summarize(jobs: JobStore, plan: Plan, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every part into the report's section."""
    q, spec = _q(plan), plan.spec.quality
    d = _dir(plan)
    nb = neighbors.load([str(d / f"neighbors-{b}.npz") for b in range(len(q.blocks))])
    paths = shard_paths(jobs, plan)  # (checks every shard: once)
    probe = {k: v for k, v in parts["probe"].items() if k not in ("part", "seconds")}
    signals = summary.SIGNALS
    where = summary.split_of({n: plan.splits.of(n) for n in ("train", "val", "test")})
    digests = plan.digests() if plan.fingerprint_mode == "content" else None
    y_of = np.full(plan.n_samples, -1, np.int64)
    y_of[nb.idx] = nb.y
    natural: dict[str, float] = {}
    best: dict[str, np.ndarray] | str | None = None  # nearest distinct neighbours, once
    copy_recall = probe.get("copy_recall")
    if spec.near_duplicate_threshold is not None:
        thresholds: dict[str, float | None] = {s: spec.near_duplicate_threshold
                                               for s in signals}
        how = "quality.near_duplicate_threshold"
    elif "features" in probe:
        thresholds = {s: probe.get(s, {}).get("threshold") for s in signals}
        how = "calibrated on perturbed copies of the job's samples"
        # a leak must be more alike than the data's own distinct same-class pairs are
        best = summary.nearest_distinct(nb, where, y_of, digests)
        natural = summary.natural_likeness(best) if isinstance(best, dict) else {}
        raised = [s for s in signals if thresholds[s] is not None
                  and natural.get(s, 0.0) > float(thresholds[s] or 0.0)]
        for s in raised:
            thresholds[s] = natural[s]
        if raised:
            how += (f", raised for {' and '.join(raised)} to the similarity distinct "
                    "same-class samples of this data reach 0.1% of the time")
            copy_recall = None  # measured at the calibrated thresholds: now at most that
    else:  # (the aligned scores run higher than plain cosines: uncalibrated, unused)
        thresholds = {"features": FALLBACK_THRESHOLD, "signatures": FALLBACK_THRESHOLD,
                      "aligned": None, "detail": None}
        how = f"default ({probe.get('note', 'not calibrated')})"
    found, confirmed = summary.pairs(nb, thresholds, digests), dict[str, Any]()
    trained = np.asarray([where.get(int(i)) == "train" for i in nb.idx], bool)
    stands: dict[str, Any] = {}
    passing = np.zeros(len(nb.idx), bool)
    if best is not None:  # calibrated: near pairs must agree in fine detail too (images),
        found, confirmed = summary.confirm(found, nb, probe.get("detail", {}),
                                           neighbors.detail_scorer(paths))
        # and a copy its sample's other candidates are far from counts (the ratio test)
        found, stands, passing = standout.apply(found, nb, probe.get("detail", {}), trained)
    section: dict[str, Any] = {
        "modality": plan.backbone.preprocessing.get("modality", "image"),  # (signals' names)
        "near_duplicate_threshold": {
            **thresholds, "source": how, "calibration": {s: probe[s] for s in signals
                                                         if s in probe},
            "natural_likeness": natural,
            "expected_copy_recall": copy_recall, "confirmed_by_detail": confirmed,
            "standout": stands,
            **({"note": "shards without image signatures: features only"}
               if nb.sig_nbr is None else {})},
        "duplicates": summary.duplicates(found, where, len(found) + 1),
        "removed_at_planning": [e.model_dump() for e in plan.excluded][:spec.max_listed],
        "removed_at_planning_count": len(plan.excluded),
        "outliers": summary.outliers(nb, spec.outlier_z, where, y_of, plan.n_samples),
        "label_issues": labels.from_folds([d / f"fold-{f}.npz" for f in range(q.folds)],
                                          nb, plan.n_samples),
        "learning_curve": _curve(q, parts, spec.target_top1, len(plan.splits.val)),
        "shift": {k: v for k, v in parts["shift"].items() if k not in ("part", "seconds")},
        "balance": shift.balance({n: y_of[np.asarray(plan.splits.of(n), np.int64)]
                                  for n in ("train", "val", "test")}, len(plan.class_names)),
        "pretraining_domain": probe.get("familiarity", {"note": probe.get("note")}),
        "nonfinite": {"count": len(nb.nonfinite),
                      "indices": sorted(int(i) for i in nb.nonfinite)[:spec.max_listed]},
    }
    section["duplicates"]["false_leak"] = summary.false_leak_rate(
        nb, thresholds, where, y_of, digests, best,
        (passing[trained], standout.TAIL) if "gap" in stands else None)
    summary.qualify_leaks(section, len(plan.splits.val) + len(plan.splits.test))
    summary.qualify(section, plan.backbone.weights_id, _pretraining(plan))
    # every finding, for the export a reviewer works through; the page lists the first ones
    section["flagged"] = summary.flagged(section, found, where)
    summary.shorten(section, spec.max_listed)
    if len(nb.nonfinite):
        section["nonfinite"]["note"] = (
            f"{len(nb.nonfinite)} samples have NaN/inf features and were left out of the "
            "quality analysis; fix: check the backbone's precision (fp16 overflow) and those "
            "images")
    return section


def _reused(plan: Plan, q: QualityPlan) -> dict[str, Any]:
    """The stage's result for these features, split and settings, from the store.

    Raises:
        JobError: it vanished or changed since planning.
    """
    try:
        text = files.read_text(q.cache_path)
        section = json.loads(text) if text is not None else None
    except (ValueError, StoreError):
        section = None
    if not isinstance(section, dict) or section.get("key") != q.key:
        raise JobError(f"job {plan.job_id}: the stored quality result {q.cache_path!r} vanished "
                       "or changed since planning; fix: featurefleet retry (it runs the stage "
                       "again)")
    section.pop("key", None)
    section["reused"] = {"from": q.cache_path, "seconds_then": section.get("seconds")}
    section["seconds"] = 0.0
    return section


def _curve(q: QualityPlan, parts: dict[str, dict[str, Any]],
           targets: tuple[float, ...], val_samples: int) -> dict[str, Any]:
    points = [parts[f"curve.{i}"] for i in range(len(q.fractions))]
    good = [{k: p[k] for k in ("fraction", "samples", "per_class", "val_top1")}
            for p in points if "val_top1" in p]
    if not good:
        return {"note": next((p["note"] for p in points if "note" in p), "no points")}
    return {"points": curve.merged(good), "l2": q.l2,
            "fit": curve.fit(good, targets, val_samples)}


def _pretraining(plan: Plan) -> dict[str, Any] | None:
    """The "did it help?" of the pretraining job whose encoder this job probes, if any."""
    wid = plan.backbone.weights_id
    if not wid.startswith("job:"):
        return None
    report = Path(plan.spec.output).expanduser().resolve() / "jobs" / wid[4:] / "report.json"
    try:
        found = json.loads(report.read_bytes()).get("did_it_help")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) and "summary" in found else None
