"""The quality section of a report (``report.json`` → ``quality``; ``report.html``: thumbnails
of leak pairs side by side, suspected label errors with given and suggested label, outliers,
the learning curve, the shift numbers), the page of a ``kind: quality`` job, and the short
summary ``featurefleet report`` prints."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.plan import Plan
from pipeline.quality.summary import SIGNALS
from pipeline.reports.plots import curve_svg
from pipeline.reports.templating import fragment, render
from pipeline.sources import Source

SHOWN = 12  # thumbnails per kind of finding


def shown(section: dict[str, Any]) -> list[int]:
    """The samples whose thumbnails the page shows."""
    ids: list[int] = []
    for leak in section.get("duplicates", {}).get("leaks", [])[:SHOWN]:
        ids += [leak["index"], leak["twin"]]
    for e in section.get("removed_at_planning", [])[:SHOWN]:
        ids += [e["index"]] + ([e["twin"]] if e.get("twin") is not None else [])
    for pair in section.get("duplicates", {}).get("within_pairs", [])[:SHOWN]:
        ids += [pair["a"], pair["b"]]
    ids += [i["index"] for i in section.get("label_issues", {}).get("issues", [])[:SHOWN]]
    ids += [i["index"] for i in section.get("outliers", {}).get("items", [])[:SHOWN]]
    return sorted(set(ids))


SNIPPET = 160  # characters of a text shown where an image would be a thumbnail


def thumbnails(source: Source, ids: list[int], side: int = 64) -> dict[str, str]:
    """PNG data URIs of the samples (longest side ``side`` px), or a text's first
    characters; unreadable ones left out."""
    from PIL import Image

    out: dict[str, str] = {}
    loaded = source.load(ids) if ids else None
    for i, im in zip(loaded.indices if loaded else [], loaded.images if loaded else [],
                     strict=True):
        if isinstance(im, str):  # a text: its first words (the page escapes them)
            out[str(i)] = im[:SNIPPET] + ("…" if len(im) > SNIPPET else "")
            continue
        if not isinstance(im, np.ndarray):  # an audio clip: its spectrogram
            im = spectrogram_picture(im.samples, im.rate, side)
        pic = Image.fromarray(im)
        pic.thumbnail((side, side))
        buf = io.BytesIO()
        pic.save(buf, "PNG")
        out[str(i)] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return out


def spectrogram_picture(x: np.ndarray, rate: int, side: int = 64) -> np.ndarray:
    """A clip's log-power spectrogram as a ``side`` x ``2 * side`` RGB picture (time to the
    right, frequency up on a log axis from 60 Hz, 70 dB of range): what the page shows
    where an image would be a thumbnail."""
    from pipeline.preprocess import power_frames

    n_fft = 512 if rate > 12_000 else 256
    starts = np.linspace(0, max(len(x), n_fft) - n_fft, 2 * side).astype(np.int64)
    power = power_frames(x, n_fft, starts)  # (columns, bins)
    freqs = np.fft.rfftfreq(n_fft, 1 / rate)
    rows = np.geomspace(60, rate / 2, side)
    grid = np.stack([np.interp(rows, freqs, p) for p in power], axis=1)  # (side, cols)
    db = 10 * np.log10(grid + 1e-12)
    level = np.clip((db - (db.max() - 70)) / 70, 0, 1)[::-1]  # high frequencies at the top
    grey = (255 * (1 - level)).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def brief(section: dict[str, Any]) -> dict[str, Any]:
    """The numbers a listing or the job record shows."""
    dup = section.get("duplicates", {})
    fit = section.get("learning_curve", {}).get("fit", {})
    return {"leaks": len(dup.get("leaked", [])), "near_duplicate_pairs": dup.get("pairs", 0),
            "label_issues": None if section.get("label_issues", {}).get("withheld")
            else section.get("label_issues", {}).get("count"),
            "outliers": section.get("outliers", {}).get("count"),
            "shift_auc": section.get("shift", {}).get("auc"),
            "domain": section.get("pretraining_domain", {}).get("domain"),
            "more_data_pays_off": fit.get("more_data_pays_off"),
            "excluded": sum(len(v) for v in section.get("excluded", {}).values())}


SIGNAL_NAMES = {"features": "features", "signatures": "thumbnail",
                "aligned": "thumbnail over small crops", "detail": "fine detail, aligned",
                "standout": "fine detail, standing out"}
# what the signature is of each kind of sample (``preprocess.signatures``)
SIGNATURE_NAMES = {"image": "thumbnail", "text": "wording (character 3-grams)",
                   "audio": "spectrogram thumbnail"}


def signal_names(section: dict[str, Any]) -> dict[str, str]:
    """The near-duplicate signals in words, for this section's kind of sample."""
    kind = SIGNATURE_NAMES.get(section.get("modality", "image"), "signature")
    return {**SIGNAL_NAMES, "signatures": kind}


def shift_line(sh: dict[str, Any], class_names: list[str]) -> str:
    """The train-vs-test finding in words (the terminal's line; the page says the same)."""
    worst = ", ".join(_name(class_names, c) for c in sh.get("most_shifted", []))
    verdict = {"none": "no shift", "mild": "a mild shift", "strong": "a strong shift"}
    return (f"a linear classifier tells test samples from training ones with AUC "
            f"{sh['auc']:.3f} (0.5: no better than chance, 1: always): "
            f"{verdict.get(sh['shift'], sh['shift'])}; {sh['advice']}"
            + (f"; most shifted classes: {worst}" if worst else ""))


def summary_lines(section: dict[str, Any], class_names: list[str]) -> list[str]:
    """A few lines for the terminal."""
    dup = section.get("duplicates", {})
    thr = section.get("near_duplicate_threshold", {})
    names = signal_names(section)
    used = ", ".join(f"{names[s]} ≥ {thr[s]}" for s in SIGNALS
                     if thr.get(s) is not None) or "exact copies only"
    dropped = (thr.get("confirmed_by_detail") or {}).get("dropped")
    lines = [f"duplicates: {dup.get('pairs', 0)} pair(s) (similarity of {used}; "
             f"{thr.get('source')}); {len(dup.get('leaked', []))} held-out sample(s) with a "
             f"twin in another split; {section.get('removed_at_planning_count', 0)} exact "
             "copies removed at planning"
             + (f"; {dropped} pair(s) alike only as thumbnails set aside (their fine detail "
                "differs)" if dropped else "")]
    stands = thr.get("standout") or {}
    if stands.get("added"):
        lines.append(f"duplicates, standing out: {stands['note']}")
    call = dup.get("leak_call") or {}
    if call.get("note"):
        lines.append(f"leaks: {call['note']}")
    li = section.get("label_issues", {})
    if li.get("withheld"):
        lines.append(f"label issues: not assessed ({li['note']})")
    elif "count" in li:
        nm = li.get("noise_model") or {}
        sure = (f". A noise model fitted to this data (labels flipped at random) expects "
                f"about {nm.get('expected_wrong_labels', 0):.0f} wrong labels in all; by it "
                f"about {li['expected_precision']:.0%} of the flags are wrong labels and they "
                f"catch about {li['expected_recall']:.0%} of the wrong ones (estimates, not "
                "measurements)" if li.get("expected_precision") is not None else "")
        cl = li.get("confident_learning")
        if cl and li["count"]:
            sure += (f"; confident learning (cleanlab), a second method, also flags "
                     f"{cl['agrees']} of them")
        lines.append(f"label issues: {li['count']} of {li['checked']} labels look wrong "
                     f"(out-of-fold top-1 {li['oof_top1']:.3f}){sure}")
    elif "note" in li:
        lines.append(f"label issues: {li['note']}")
    out = section.get("outliers", {})
    if out.get("count"):
        lines.append(
            f"outliers: {out['count']} of {out.get('checked', '?')} samples lie far from all "
            f"their neighbours (mean cosine distance to the {out.get('neighbours', 'k')} "
            f"nearest more than {out['z_threshold']} robust standard deviations above the "
            f"median, {out['median_distance']:.3f}): rare cases or images from another "
            "domain; review them on the page")
    elif "count" in out:
        lines.append(f"outliers: none of {out.get('checked', '?')} samples lies far from all "
                     "its neighbours")
    else:
        lines.append(f"outliers: {out.get('note')}")
    lc = section.get("learning_curve", {})
    fit = lc.get("fit", {})
    if "advice" in fit:
        lines.append(f"learning curve: {fit['advice']}")
    elif lc.get("note") or fit.get("note"):
        lines.append(f"learning curve: {lc.get('note') or fit.get('note')}")
    sh = section.get("shift", {})
    if "auc" in sh:
        lines.append(f"train vs test: {shift_line(sh, class_names)}")
    dom = section.get("pretraining_domain", {})
    if "domain" in dom:
        lines.append(f"pretraining domain: {dom['domain']} ({dom['measured_by']}): "
                     f"{dom['advice']}")
    ev = section.get("evaluation")
    if ev and ev.get("leaked_test_samples") and call.get("confident", True):
        lines.append(f"test top-1 {ev['top1_all_test']} with the {ev['leaked_test_samples']} "
                     f"leaked test samples, {ev['top1_without_leaks']} without")
    excluded = {k: len(v) for k, v in section.get("excluded", {}).items()}
    if excluded:
        lines.append("excluded by quality.exclude: " + ", ".join(
            f"{n} {k}" for k, n in excluded.items()))
    return lines


def _name(names: list[str], c: Any) -> str:
    return names[c] if isinstance(c, int) and 0 <= c < len(names) else str(c)


def section_html(rep: dict[str, Any]) -> str:
    """The quality section of a report page ("" when the job had no quality stage)."""
    q = rep.get("quality")
    if not q:
        return ""
    names = rep.get("data", {}).get("class_names", [])
    thumbs_path = q.get("thumbnails")
    thumbs = json.loads(Path(thumbs_path).read_text()) if thumbs_path and Path(
        thumbs_path).is_file() else {}
    ids = q.get("sample_ids", {})
    lc = q.get("learning_curve", {})
    pts = lc.get("points", [])
    fit = lc.get("fit", {})
    series = {"validation top-1": [(math.log10(p["per_class"]), p["val_top1"]) for p in pts]}
    if "plateau" in fit and pts:
        lo, hi = math.log10(pts[0]["per_class"]), math.log10(2 * pts[-1]["per_class"])
        xs = [lo + (hi - lo) * i / 20 for i in range(21)]
        series["power law"] = [(x, fit["plateau"] - fit["a"] * (10 ** x) ** -fit["b"])
                               for x in xs]
    return fragment(
        "quality.html.j2", q=q, thumbs=thumbs, ids=ids, name=lambda c: _name(names, c),
        signal_names=signal_names(q),
        shift=shift_line(q["shift"], names) if "auc" in q.get("shift", {}) else "",
        curve=curve_svg(series, "log10 labeled samples per class", "top-1", "learning-curve")
        if pts else "", lines=summary_lines(q, names),
        curve_rows=[[p["fraction"], p["samples"], f"{p['per_class']:g}",
                     f"{p['val_top1']:.3f}"] for p in pts])  # the summary's 3 decimals


def build(plan: Plan, record: dict[str, Any], shards: list[dict[str, Any]],
          section: dict[str, Any]) -> dict[str, Any]:
    """The report of a ``kind: quality`` job."""
    now = time.time()
    created = float(record.get("created", now))
    s = plan.splits
    return {"schema": 1, "kind": "quality", "status": "SUCCESS", "job_id": plan.job_id,
            "name": plan.spec.name, "quality": section,
            "data": {"source": plan.spec.data.source, "samples": plan.n_samples,
                     "split_sizes": {"train": len(s.train), "val": len(s.val),
                                     "test": len(s.test)},
                     "class_names": plan.class_names,
                     "excluded": [e.model_dump() for e in plan.excluded]},
            "backbone": {"name": plan.backbone.name, "weights_id": plan.backbone.weights_id,
                         "weights_sha256": plan.backbone.weights_sha256,
                         "preprocessing": plan.backbone.preprocessing},
            "feature_store": {"key": plan.key, "dir": plan.shard_dir}, "shards": shards,
            "timings": {"total_s": round(now - created, 3),
                        "quality_s": section.get("seconds"),
                        "quality_reused": "reused" in section},
            "spec": plan.spec.to_dict(), "created": created, "finished": now}


def page_html(rep: dict[str, Any]) -> str:
    """The whole page of a ``kind: quality`` job."""
    return render("quality_page.html.j2", rep=rep, section=section_html(rep),
                  finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["finished"])))


FLAGGED_COLUMNS = ("sample_id", "index", "split", "finding", "score", "score_means",
                   "given_label", "suggested_label", "twin_id", "twin_split")


def write_flagged(path: Path, rows: list[dict[str, Any]], sample_id: Any,
                  class_names: list[str], where: dict[int, str]) -> Path:
    """``flagged.csv``: every finding of the quality stage, one row each, for review
    (``featurefleet quality JOB --export FILE`` copies it; ``quality.exclude_file`` takes
    the reviewed list back)."""
    import csv

    from pipeline.fsio import atomic_write_text
    from pipeline.quality.summary import SCORES
    from pipeline.reports.cells import csv_cell

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(FLAGGED_COLUMNS)
    for r in rows:
        i, twin = int(r["index"]), r.get("twin")
        w.writerow([csv_cell(str(sample_id(i))), i, where.get(i, ""), r["finding"], r["score"],
                    SCORES[r["finding"]],
                    "" if r.get("given") is None else csv_cell(class_names[int(r["given"])]),
                    "" if r.get("suggested") is None
                    else csv_cell(class_names[int(r["suggested"])]),
                    "" if twin is None else csv_cell(str(sample_id(int(twin)))),
                    "" if twin is None else where.get(int(twin), "")])
    return atomic_write_text(path, buf.getvalue(), fsync=False)
