"""``featurefleet predict``: a few files or texts here (the classifier loaded once), or a
whole data set on the fleet (``--data``: a ``kind: predict`` job)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.client.running import run_local, wait_and_summarize
from pipeline.errors import FeaturefleetError
from pipeline.spec import JobSpec


def _stdin_text() -> str:
    """Standard input as UTF-8 text (one text a line).

    Raises:
        FeaturefleetError: binary or not UTF-8.
    """
    raw = sys.stdin.buffer.read(64 << 20)
    if b"\0" in raw[:8192]:
        raise FeaturefleetError("standard input is binary data, not text; fix: pipe UTF-8 "
                                "text, one text a line (--text-file -)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FeaturefleetError(f"standard input is not UTF-8 (byte {exc.start}); fix: "
                                "convert it, e.g. iconv -t UTF-8") from None


def _batch_spec(args: argparse.Namespace) -> JobSpec:
    """The ``kind: predict`` spec for ``featurefleet predict MODEL --data D``."""
    from pipeline.sources import guess_source

    model = Path(args.model).expanduser().resolve()
    if not (model / "plan.json").is_file():
        raise FeaturefleetError(f"{args.model!r} is not a job folder (no plan.json); fix: "
                                "batch prediction takes <output>/jobs/<id> of a probe job")
    source = args.source or guess_source(args.data, _model_modality(model))
    # every unreadable sample gets a row with its error instead of failing the job
    data: dict[str, Any] = {"source": source, "max_skipped_fraction": 1.0}
    if source != "digits":
        data["path"] = args.data
    output = args.output or str(model.parent.parent)
    return JobSpec.from_dict({"name": f"predict-{model.name}", "kind": "predict",
                              "data": data, "output": output,
                              "predict": {"model": str(model), "head": args.head,
                                          "top": args.top}})


def _model_modality(model: Path) -> str:
    from pipeline.plan import read_plan

    return str(read_plan(model).backbone.preprocessing.get("modality", "image"))


def predict(args: argparse.Namespace) -> int:
    from pipeline.predict import load_classifier

    if args.classes:
        names = load_classifier(args.model, device="cpu").class_names
        print(f"{len(names)} classes: " + ", ".join(names))
        return 0
    args.images = [*args.images, *args.audio]
    if args.data is not None:
        if args.images or args.text or args.text_file:
            raise FeaturefleetError("give --data (a whole data set, on the fleet) or files / "
                                    "texts (here), not both")
        spec = _batch_spec(args)
        if args.local:
            return run_local(spec, f"batch prediction with {args.model} on {args.data}",
                              "predict", args.extract_workers, args.timeout)
        from pipeline.client.api import submit

        job = submit(spec, broker=args.broker)
        print(f"submitted job {job.id}: batch prediction with {args.model} on {args.data}",
              flush=True)
        return wait_and_summarize(job, args.timeout) if args.wait else 0
    texts = list(args.text)
    if args.text_file:
        lines = _stdin_text() if args.text_file == "-" else _read_lines(args.text_file)
        texts += [line for line in lines.splitlines() if line.strip()]
    inputs = texts or args.images
    if not inputs or (texts and args.images):
        raise FeaturefleetError("give image or audio files, or texts with --text/--text-file "
                                "(not both); fix: featurefleet predict MODEL cat.jpg (or "
                                "clip.wav), or featurefleet predict MODEL --text 'some words'")
    clf = load_classifier(args.model)
    if (clf.modality == "text") != bool(texts):
        what_it_reads = {"audio": "audio clips"}.get(clf.modality, f"{clf.modality}s")
        raise FeaturefleetError(f"this classifier reads {what_it_reads}; fix: pass "
                                + ("--text or --text-file" if clf.modality == "text"
                                   else f"{clf.modality} files"))
    results = clf.predict(inputs, top=args.top)
    failed = [r for r in results if r.get("error")]
    what = "text" if texts else clf.modality
    if args.json:
        print(json.dumps([{what: i, **r} for i, r in zip(inputs, results, strict=True)],
                         indent=2))
    else:
        for item, r in zip(inputs, results, strict=True):
            if r.get("error"):
                print(f"featurefleet: error: {r['error']}", file=sys.stderr)
                continue
            top = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"])
            shown = item if not texts or len(item) <= 60 else item[:57] + "..."
            print(f"{shown}: {r['label']} ({r['probability']:.3f})   top: {top}")
    if failed:
        print(f"featurefleet: {len(failed)} of {len(results)} {what}(s) could not be "
              f"{'used' if texts else 'read'}", file=sys.stderr)
    return 1 if failed else 0


def _read_lines(path: str) -> str:
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise FeaturefleetError(f"cannot read texts from {path!r} ({type(exc).__name__}); fix: "
                                "pass a UTF-8 file with one text per line") from None
