"""HTML pages from Jinja2 templates (``pipeline/reports/templates``, autoescaped): the job
report and the comparison leaderboard. Self-contained: inline CSS and SVG, no scripts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.fsio import atomic_write_text
from pipeline.reports import quality
from pipeline.reports.plots import confusion_svg, f1_svg, sweep_svg
from pipeline.reports.templating import render


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_report(rep: dict[str, Any]) -> str:
    m = rep["metrics"]
    t = rep["timings"]
    names = rep["data"]["class_names"]
    summary = [["test top-1", _fmt(m["top1"])], ["test top-5", _fmt(m["top5"])],
               ["balanced accuracy", _fmt(m["balanced_accuracy"])],
               ["macro F1", _fmt(m["macro_f1"])], ["log loss", _fmt(m["log_loss"])],
               ["expected calibration error", _fmt(m["ece"])],
               ["test samples", m["samples"]]]
    heads = [[n, _fmt(h["metrics"]["top1"]), _fmt(h["metrics"]["top5"]),
              _fmt(h["metrics"]["balanced_accuracy"]), _fmt(h["metrics"]["log_loss"]),
              _fmt(h["metrics"]["ece"]),
              ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in h.items() if k in ("l2", "k", "best_epoch"))]
             for n, h in rep.get("heads", {}).items()]
    ft = rep.get("train", {}).get("finetune")
    epochs = [[h["epoch"], h["loss"], _fmt(h["val_top1"]), h["images_per_s"],
               "best" if h["epoch"] == ft["best_epoch"] else ""]
              for h in ft["history"]] if ft else []
    resumes = [[r["reason"], r["epoch"] + 1, r["step"], r["attempt"]]
               for r in ft["resumes"]] if ft else []
    data = rep["data"]
    used = data.get("split_used", {})
    skipped_by = data.get("split_skipped", {})
    split_rows = [[k, v, used.get(k, ""), skipped_by.get(k, "")]
                  for k, v in data["split_sizes"].items()]
    split_text = ", ".join(f"{k} {used.get(k, v)}" for k, v in data["split_sizes"].items())
    shards = [[s["id"], s["rows"], "yes" if s["cached"] else "no", s["worker"] or "",
               (s["sha256"] or "")[:12]] for s in rep["shards"]]
    return render(
        "report.html.j2", rep=rep, bb=rep["backbone"], summary=summary, heads=heads, ft=ft,
        epochs=epochs, resumes=resumes, split_rows=split_rows, split_text=split_text,
        times=[[k, v] for k, v in t.items()], shards=shards,
        skipped=data.get("skipped", []), excluded=data.get("excluded", []),
        warnings=data.get("warnings", []),
        finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["finished"])),
        sweep_svg=sweep_svg(rep.get("sweep")),
        confusion_svg=confusion_svg(m.get("confusion_matrix"), names),
        confusions=[[c["true"], c["predicted"], c["count"]]
                    for c in m.get("confusion_top", [])[:20]],
        n_classes=len(names),
        f1_svg=f1_svg(m["per_class"]), sections=[quality.section_html(rep)])


def render_predictions(rep: dict[str, Any]) -> str:
    """The page of a ``kind: predict`` job: what was predicted, how sure, what failed."""
    s = rep["predictions"]
    n = max(1, s["predicted"])
    low = s["low_confidence"]
    summary = [["samples predicted", s["predicted"]], ["could not be read", s["failed"]],
               [f"top probability below {low['threshold']:g}",
                f"{low['count']} ({low['count'] / n:.1%})"]]
    if s.get("given_labels"):
        g = s["given_labels"]
        summary.append(["agree with the data's own labels",
                        f"{g['agree']} of {g['samples']} ({g['share']:.1%})"])
    summary.append(["samples per second (whole job)", rep["timings"].get("samples_per_s")])
    return render(
        "predict.html.j2", rep=rep, s=s, bb=rep["backbone"], summary=summary,
        counts=[[c, k, f"{k / n:.1%}"] for c, k in s["class_counts"].items()],
        least=[[r["id"], r["predicted"], f"{r['probability']:.3f}"]
               for r in s["least_confident"]],
        errors=[[e["id"], e["reason"]] for e in s["errors"]],
        times=[[k, v] for k, v in rep["timings"].items()],
        finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["finished"])))


def render_embed(rep: dict[str, Any]) -> str:
    """The page of a ``kind: embed`` job: the index, its recall, and example queries with
    their nearest neighbours (thumbnails, text snippets or spectrograms)."""
    import json

    e = rep["embeddings"]
    thumbs_path = rep.get("thumbnails")
    thumbs = json.loads(Path(thumbs_path).read_text()) if thumbs_path and Path(
        thumbs_path).is_file() else {}
    summary = [["vectors", e["count"]], ["dimensions", e["dim"]], ["metric", e["metric"]],
               ["index", e["index"] + (f" (nlist {e['nlist']}, nprobe {e['nprobe']})"
                                       if e.get("nlist") else "")],
               ["recall@10 against exact search",
                "1 (exact)" if e["recall_at_10"] is None else e["recall_at_10"]],
               ["export + index seconds", e["seconds"]]]
    return render("embed.html.j2", rep=rep, e=e, bb=rep["backbone"], summary=summary,
                  examples=rep.get("examples", []), thumbs=thumbs,
                  times=[[k, v] for k, v in rep["timings"].items()],
                  finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["finished"])))


def write_report_html(rep: dict[str, Any], path: Path) -> Path:
    kind = rep.get("kind")
    page = quality.page_html(rep) if kind == "quality" else (
        render_predictions(rep) if kind == "predict" else
        render_embed(rep) if kind == "embed" else
        render_recommend(rep) if kind == "recommend" else render_report(rep))
    return atomic_write_text(path, page, fsync=False)


def render_recommend(rep: dict[str, Any]) -> str:
    """The page of a ``kind: recommend`` job: the interactions and their split, then warm and
    cold leaderboards (Recall@K, NDCG@K, coverage, users evaluated)."""
    res = rep["recommend"]
    ks = sorted({int(k.split("@")[1]) for r in rep["leaderboard"] for k in r if "@" in k})
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + [f"coverage@{ks[-1]}"]
    boards = {part: [[r["model"], *[r.get(c) for c in cols], r["users"]]
                     for r in rep["leaderboard"] if r["part"] == part]
              for part in ("warm", "cold")}
    i = rep["interactions"]
    facts = [["interactions read", i["rows"]], ["kept (positives, no duplicates)", i["kept"]],
             ["users", i["users"]], ["items (with interactions)",
                                     f"{rep['data']['items']} ({i['items_with_interactions']})"],
             ["split", i["split"]], ["training interactions", i["train"]],
             ["warm test interactions", i["warm_test"]],
             ["cold items (every interaction held out)", i["cold_items"]],
             ["cold test interactions", i["cold_test"]],
             *[[f"left out: {k.replace('_', ' ')}", v] for k, v in i["left_out"].items() if v],
             ["users with one interaction (trained on, not evaluated)",
              i["one_interaction_users"]],
             ["users with no training interaction (only popularity can rank for them)",
              i["users_without_training"]]]
    cf = res.get("collaborative") or {}
    return render("recommend.html.j2", rep=rep, res=res, cols=cols, boards=boards, facts=facts,
                  cf=cf, bb=rep["backbone"],
                  times=[[k, v] for k, v in rep["timings"].items()],
                  finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["finished"])))


def render_leaderboard(board: dict[str, Any], columns: list[tuple[str, str]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v <= 1 else f"{v:.1f}"
        if isinstance(v, int) and v > 100_000:
            return f"{v / 1e6:.2f} M"
        return "" if v is None else str(v)

    return render("leaderboard.html.j2", board=board, columns=columns, cell=cell)
