"""What the command line shows: the progress line (its text: :mod:`pipeline.jobs.progress`),
a comparison's progress, the report summary, the leaderboard."""

from __future__ import annotations

import shlex
import sys
import time
from typing import Any

from pipeline.errors import JobError
from pipeline.jobs.progress import Throughput, format_progress
from pipeline.jobs.records import FINAL


class ProgressLine:
    """A one-line progress bar from the job record (rewritten in place on a terminal); the
    rate and ETA come from the recent throughput."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""
        self.last_time = 0.0
        self.throughput = Throughput()

    def __call__(self, st: dict[str, Any]) -> None:
        self.throughput.observe(st)
        line = format_progress(st, self.throughput)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last)))
            self.stream.flush()
        elif line != self.last and (now - self.last_time > 2 or st["status"] in FINAL):
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_time = now
        self.last = line
        if st["status"] in FINAL and self.tty:
            self.stream.write("\n")


class CompareProgress:
    """A comparison's progress: a line per child job (its stage and progress line) whenever
    it changed, at most every ``every_s`` seconds per child, and once more when it ends."""

    def __init__(self, child_status: Any, stream: Any = sys.stderr, every_s: float = 5.0) -> None:
        self.child_status = child_status  # job id -> its record (JobStore.get)
        self.stream = stream
        self.every_s = every_s
        self.seen: dict[str, tuple[str, float]] = {}
        self.throughput: dict[str, Throughput] = {}

    def __call__(self, rec: dict[str, Any]) -> None:
        now = time.monotonic()
        for job_id in rec.get("jobs") or []:
            try:
                st = self.child_status(job_id)
            except JobError:  # its record is not written yet: the next poll
                continue
            tp = self.throughput.setdefault(job_id, Throughput())
            tp.observe(st)
            label = str(st.get("name") or job_id).removeprefix(str(rec.get("name") or "") + ":")
            line = f"{label}: {format_progress(st, tp)}"
            last, at = self.seen.get(job_id, ("", -1e9))
            final = st.get("status") in FINAL
            if line != last and (final or now - at >= self.every_s):
                self.stream.write(line + "\n")
                self.stream.flush()
                self.seen[job_id] = (line, now)


def pretrain_summary(rep: dict[str, Any]) -> str:
    last = (rep["train"].get("history") or [{}])[-1]
    rows = [("job", f"{rep['job_id']} ({rep['name']})"),
            ("method", f"{rep['method']} on {rep['backbone']['arch']} "
                       f"[{rep['backbone']['init']}] "
                       f"@{input_size(rep['backbone']['preprocessing'])}"),
            ("data", f"{rep['data']['source']}: {rep['data']['samples_used']} images (labels "
                     "unused)"),
            *([("recipe", rep["recipe"])] if rep.get("recipe") else []),
            ("final loss", str(last.get("loss", "-"))),
            *([("kNN / probe top-1", f"{last['knn_top1']:.4f} / {last['probe_top1']:.4f} "
                                     "(labeled evaluation samples)")]
              if "knn_top1" in last else []),
            *([("did it help?", rep["did_it_help"]["summary"])] if rep.get("did_it_help")
              else []),
            ("ranks", f"{rep['train'].get('world_size', 1)} on {rep['train'].get('device')}"),
            *[("resumed", f"{r['reason']} at epoch {r['epoch'] + 1} step {r['step']}")
              for r in rep["train"].get("resumes", [])],
            ("train", f"{rep['timings']['train_s']} s"),
            ("backbone", f"{rep['backbone_name']}  (backbone: {{name: {rep['backbone_name']}}})"),
            ("encoder", str(rep["encoder"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _finetune_rows(ft: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not ft:
        return []
    resumes = "; ".join(f"{r['reason']} at epoch {r['epoch'] + 1} step {r['step']}"
                        for r in ft.get("resumes", []))
    return [("fine-tuning", f"{ft['epochs']} epochs on {ft['device']}, best epoch "
                            f"{ft['best_epoch']} (val top-1 {ft['best_val_top1']:.4f})"),
            *([("resumed", resumes)] if resumes else [])]


def _data_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """What was left out of the data, said where the numbers are."""
    rows = []
    skipped = data.get("skipped", [])
    if skipped:
        shown = "; ".join(f"{s['id']} ({s['reason']})" for s in skipped[:3])
        rows.append(("skipped", f"{len(skipped)} unreadable: {shown}"
                                + (" ..." if len(skipped) > 3 else "")))
    excluded = data.get("excluded", [])
    if excluded:
        kinds: dict[str, int] = {}
        for e in excluded:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        rows.append(("excluded", f"{len(excluded)} at planning ("
                                 + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                                 + ")"))
    if data.get("truncated"):
        rows.append(("truncated", f"{data['truncated']} text(s) longer than the token limit "
                                  "were cut to it"))
    rows += [("warning", w) for w in data.get("warnings", [])]
    return rows


def _unit(rep: dict[str, Any]) -> str:
    modality = rep["backbone"]["preprocessing"].get("modality", "image")
    return {"text": "texts", "audio": "clips"}.get(modality, "img")


def input_size(pre: dict[str, Any]) -> str:
    """``224px`` for an image backbone, ``128 tokens`` for a text one, ``16 kHz, 1.6 s windows``
    for an audio one."""
    from pipeline.backbones import describe_input

    return describe_input(pre).replace(" px", "px")


def quality_summary(rep: dict[str, Any]) -> str:
    from pipeline.reports.quality import summary_lines

    d = rep["data"]
    head = [f"  job       {rep['job_id']} ({rep['name']})",
            f"  backbone  {rep['backbone']['name']} [{rep['backbone']['weights_id']}] "
            f"@{input_size(rep['backbone']['preprocessing'])}",
            f"  data      {d['source']}: " + ", ".join(f"{k} {v}"
                                                     for k, v in d["split_sizes"].items())]
    return "\n".join(head + ["  " + line for line in summary_lines(rep["quality"],
                                                                   d["class_names"])])


def predict_summary(rep: dict[str, Any]) -> str:
    """A prediction job in a few lines: how many, which classes, how sure, what failed."""
    s, t = rep["predictions"], rep["timings"]
    low = s["low_confidence"]
    counts = s["class_counts"]
    shown = ", ".join(f"{c} {n}" for c, n in list(counts.items())[:8]) + (
        f", ... ({len(counts)} classes)" if len(counts) > 8 else "")
    rows = [("job", f"{rep['job_id']} ({rep['name']})"),
            ("model", ("the fine-tuned network" if rep["model"]["head"] == "finetuned" else
                       f"the {rep['model']['head']} head") + f" of job {rep['model']['job']}, "
                      f"{rep['backbone']['name']} @{input_size(rep['backbone']['preprocessing'])}"),
            ("predicted", f"{s['predicted']} samples"
                          + (f"; {s['failed']} could not be read" if s["failed"] else "")),
            ("classes", shown or "-"),
            ("low confidence", f"{low['count']} with top probability < {low['threshold']:g}"
                               + (f" ({low['share']:.1%})" if low["share"] is not None else "")),
            *([("given labels", f"{s['given_labels']['share']:.1%} of "
                                f"{s['given_labels']['samples']} agree with the prediction")]
              if s.get("given_labels") else []),
            ("time", f"{t['total_s']:.1f} s ({t.get('samples_per_s') or 0:.1f} samples/s; "
                     f"features of {t['extract_images']} extracted, "
                     f"{sum(r['rows'] or 0 for r in rep['shards'] if r['cached'])} from the "
                     "store)"),
            ("predictions", s["files"]["parquet"] + " (and .csv)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def embed_summary(rep: dict[str, Any]) -> str:
    """An embed job in a few lines: how many vectors, which index, its recall, where."""
    e, t = rep["embeddings"], rep["timings"]
    index = e["index"] + (f" ({e['nlist']} inverted lists, nprobe {e['nprobe']})"
                          if e.get("nlist") else " (exact)")
    skipped = len(rep["data"].get("skipped", []))
    rows = [("job", f"{rep['job_id']} ({rep['name']})"),
            ("backbone", f"{rep['backbone']['name']} [{rep['backbone']['weights_id']}] "
                         f"@{input_size(rep['backbone']['preprocessing'])}"),
            ("embedded", f"{e['count']} samples x {e['dim']} dimensions"
                         + (f"; {skipped} could not be read" if skipped else "")),
            ("index", index),
            ("recall@10", "1 (exact search)" if e["recall_at_10"] is None else
             f"{e['recall_at_10']:.3f} against exact search"),
            ("time", f"{t['total_s']:.1f} s (export + index {e['seconds']:.1f} s)"),
            ("embeddings", rep["files"]["table"]),
            ("search", f"featurefleet search {shlex.quote(rep['files']['job_dir'])} --id "
                       + (shlex.quote(rep["examples"][0]["query"]) if rep.get("examples")
                          else "ID"))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def recommend_summary(rep: dict[str, Any]) -> str:
    """A recommend job in a few lines: the split, then each part's models by Recall@K."""
    i, res = rep["interactions"], rep["recommend"]
    k = res["k"]
    rows = [("job", f"{rep['job_id']} ({rep['name']})"
                    + ("  [SIMULATED interactions]" if rep.get("simulated") else "")),
            ("items", f"{rep['data']['items']} ({rep['backbone']['name']} content features); "
                      f"{i['cold_items']} cold (every interaction held out)"),
            ("interactions", f"{i['kept']:,} of {i['rows']:,} rows, {i['users']:,} users, "
                             f"{i['split']} split: train {i['train']:,}, warm test "
                             f"{i['warm_test']:,}, cold test {i['cold_test']:,}")]
    for part in ("warm", "cold"):
        for r in [r for r in rep["leaderboard"] if r["part"] == part]:
            rows.append((f"{part} {r['model']}", f"Recall@{k} {r[f'recall@{k}']:.4f}  "
                         f"NDCG@{k} {r[f'ndcg@{k}']:.4f}  coverage {r[f'coverage@{k}']:.3f}"))
    rows.append(("recommendations", str(rep["files"].get("recommendations"))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def summary(rep: dict[str, Any]) -> str:
    if rep.get("kind") == "embed":
        return embed_summary(rep)
    if rep.get("kind") == "recommend":
        return recommend_summary(rep)
    if rep.get("kind") == "pretrain":
        return pretrain_summary(rep)
    if rep.get("kind") == "quality":
        return quality_summary(rep)
    if rep.get("kind") == "predict":
        return predict_summary(rep)
    m = rep["metrics"]
    t = rep["timings"]
    rows = [
        ("job", f"{rep['job_id']} ({rep['name']})"),
        ("backbone", f"{rep['backbone']['name']} [{rep['backbone']['weights_id']}] "
                     f"@{input_size(rep['backbone']['preprocessing'])}"),
        ("data", f"{rep['data']['source']}: " + ", ".join(
            f"{k} {v}" for k, v in rep["data"].get("split_used",
                                                   rep["data"]["split_sizes"]).items())),
        *_data_rows(rep["data"]),
        ("test top-1", f"{m['top1']:.4f}"),
        ("test top-5", f"{m['top5']:.4f}"),
        ("balanced accuracy", f"{m['balanced_accuracy']:.4f}"),
        ("macro F1", f"{m['macro_f1']:.4f}"),
        ("log loss / ECE", f"{m['log_loss']:.4f} / {m['ece']:.4f}"),
        *[(f"  head {name}", f"top-1 {h['metrics']['top1']:.4f}  balanced "
                             f"{h['metrics']['balanced_accuracy']:.4f}")
          for name, h in rep.get("heads", {}).items()],
        *([("L2 penalty (swept)", f"{rep['sweep']['chosen_l2']:.3g} of "
                                  f"{len(rep['sweep']['grid'])} values, val top-1 "
                                  f"{rep['sweep']['chosen_val_top1']:.4f}")]
          if rep.get("sweep") else []),
        ("strategy", f"{rep.get('strategy', 'probe')}"
                     + (f" — {rep['strategy_reason']}" if rep.get("strategy_reason") else "")),
        *_finetune_rows(rep.get("train", {}).get("finetune")),
        ("shards", f"{len(rep['shards'])} "
                   f"({sum(1 for s in rep['shards'] if s['cached'])} from cache)"),
        ("extraction", f"{t['extract_s']:.1f} s"
                       + (f", {t['extract_images_per_s']} "
                          f"{_unit(rep)}/s per task"
                          if t["extract_images_per_s"] else "")),
        ("train / evaluate", f"{t['train_s']} s / {t['evaluate_s']} s"),
        ("total", f"{t['total_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    if rep.get("quality"):
        from pipeline.reports.quality import summary_lines

        text += "\n  data quality:\n" + "\n".join(
            "    " + line for line in summary_lines(rep["quality"],
                                                   rep["data"].get("class_names", [])))
    return text



def format_leaderboard(board: dict[str, Any]) -> str:
    cols = [("rank", "#"), ("backbone", "backbone"), ("weights", "weights"),
            ("strategy", "strategy"), ("val_top1", "val"), ("test_top1", "test"),
            ("extract_images_per_s", "extract img/s"), ("train_images_per_s", "train img/s"),
            ("train_s", "train s"),
            ("feature_dim", "dim"), ("parameters", "params"), ("status", "status")]

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and v <= 1 else ("-" if v is None else str(v))

    shown = [{**r, "backbone": f"{r.get('backbone')} (baseline)"} if r.get("baseline") else r
             for r in board["rows"]]
    rows = [[h for _, h in cols]] + [[cell(r.get(k)) for k, _ in cols] for r in shown]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows)
