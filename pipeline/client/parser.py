"""The ``featurefleet`` command line's arguments: one sub-command per verb."""

from __future__ import annotations

import argparse

from pipeline.settings import BROKER_ENV


def _add_broker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=None,
                   help=f"Redis URL (default ${BROKER_ENV} or redis://127.0.0.1:6379/0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurefleet",
        description="Distributed transfer learning: pretrained features, probes, evaluation.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("demo", help="run a whole job on this machine (private Redis + workers)")
    p.add_argument("--output", default="featurefleet-demo", help="folder for outputs and store")
    p.add_argument("--data", choices=["digits", "text", "speech", "recommend"],
                   default="digits",
                   help="digits (images, EfficientNet-Lite0), text (the Debian package "
                        "index's descriptions by section, all-MiniLM-L6-v2), speech (the "
                        "Free Spoken Digit Dataset, resemblyzer; needs featurefleet[audio]) or "
                        "recommend (Debian packages as items, SIMULATED users; all-MiniLM-L6-v2 "
                        "content features for cold items)")
    p.add_argument("--movielens", default=None, metavar="DIR",
                   help="with --data recommend: a MovieLens download (ratings.csv + "
                        "movies.csv) instead of the simulated users")
    p.add_argument("--path", default=None,
                   help="with --data speech: a copy of the Free Spoken Digit Dataset (default: "
                        "a developer checkout's ../shared/data/fsdd, else downloaded)")
    p.add_argument("--task", choices=["speakers", "digits"], default="speakers",
                   help="with --data speech: who speaks (the encoder's strength) or which digit")
    p.add_argument("--backbone", default=None,
                   help="with --data speech: resemblyzer (default) or mfcc (the handcrafted "
                        "baseline)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the weights' own, 224 for efficientnet_lite0)")
    p.add_argument("--shard-size", type=int, default=300, help="images per extraction task")
    p.add_argument("--limit", type=int, default=None, help="use only N digits (smoke test)")
    p.add_argument("--extract-workers", type=int, default=1, help="extraction worker processes")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    _add_no_quality(p)

    p = sub.add_parser("run", help="run a job file on this machine alone: a private Redis and "
                                   "worker processes, progress, summary; nothing left running")
    p.add_argument("spec", help="job spec file (.yaml/.yml/.json), any kind")
    p.add_argument("--kind", choices=["classify", "pretrain", "quality", "predict", "embed",
                                      "recommend"], default=None,
                   help="override the file's kind")
    p.add_argument("--extract-workers", type=positive_int, default=1,
                   help="extraction (GPU-queue) worker processes (at least the run's nodes)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the job")
    _add_no_quality(p)

    p = sub.add_parser("worker", help="start Celery worker processes against a broker")
    _add_broker(p)
    p.add_argument("--queues", default="ff.extract,ff.train",
                   help="comma-separated queues (ff.extract: backbone, ff.train: training)")
    p.add_argument("--concurrency", type=int, default=1, help="pool processes (prefork)")
    p.add_argument("--name", default=None, help="node name (default worker-<pid>@<host>)")
    p.add_argument("--gpus", default=None,
                   help="'all' or '0,1,...': one extraction worker process per GPU (pinned with "
                        "CUDA_VISIBLE_DEVICES) plus --cpu-workers training workers; on a machine "
                        "without GPUs, --extract-workers CPU extraction workers instead")
    p.add_argument("--cpu-workers", type=int, default=1,
                   help="with --gpus: training/evaluation worker processes")
    p.add_argument("--extract-workers", type=int, default=1,
                   help="with --gpus on a machine without GPUs: CPU extraction workers")
    p.add_argument("--loglevel", default="INFO")

    for kind, text in (("pretrain", "pretrain an encoder on a job file's images (labels "
                                    "unused); its result is backbone job:<id>"),
                       ("quality", "check a job file's data: duplicates and leaks, label "
                                   "issues, outliers, a learning curve, shift (report, no "
                                   "classifier)")):
        p = sub.add_parser(kind, help=text)
        _add_broker(p)
        p.add_argument("spec", help=f"job spec file (.yaml/.yml/.json); kind is set to {kind}")
        p.add_argument("--wait", action="store_true", help="wait and print the summary")
        p.add_argument("--timeout", type=float, default=None,
                       help="seconds to wait with --wait")
        if kind == "quality":
            p.add_argument("--export", default=None, metavar="FILE",
                           help="instead: write every finding of a finished job (SPEC is its "
                                "id or folder) to FILE as CSV ('-': standard output)")

    p = sub.add_parser("submit", help="enqueue a job from a YAML/JSON spec; print its id")
    _add_broker(p)
    p.add_argument("spec", help="job spec file (.yaml/.yml/.json)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its metrics")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait")
    _add_no_quality(p)

    for verb, text in (("cancel", "cancel a job (queued shards revoked, running ones stopped)"),
                       ("retry", "run a failed job again (cached shards are reused)"),
                       ("status", "show a job's state and progress"),
                       ("watch", "follow a job's progress until it ends"),
                       ("report", "show a finished job's metrics and report path")):
        p = sub.add_parser(verb, help=text)
        _add_broker(p)
        p.add_argument("job_id")
        if verb == "retry":
            p.add_argument("--job-dir", default=None,
                           help="the job's folder: recover a job whose record was lost from "
                                "Redis (restarted without its data) from its plan")
        if verb in ("status", "report"):
            p.add_argument("--json", action="store_true", help="print JSON")
        if verb == "report":
            p.add_argument("--open", action="store_true", help="open report.html in a browser")

    sub.add_parser("bench", help="benchmark: pipeline vs bare forward vs a plain loop "
                                 "(featurefleet bench --help)")

    p = sub.add_parser("compare", help="several backbones (and strategies) on one data set: "
                       "a leaderboard (HTML + JSON)")
    _add_broker(p)
    p.add_argument("spec", help="job spec file; its backbone and strategy are replaced")
    p.add_argument("--backbones", required=True,
                   help="comma-separated name[:weights], e.g. efficientnet_lite0,resnet18:random")
    p.add_argument("--strategies", default="probe", help="comma-separated: probe,finetune,auto")
    p.add_argument("--wait", action="store_true", help="wait and print the leaderboard")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait")
    p.add_argument("--local", action="store_true",
                   help="run on this machine: private Redis + workers (implies --wait)")
    p.add_argument("--extract-workers", type=int, default=2,
                   help="with --local: extraction worker processes")

    p = sub.add_parser("search", help="nearest neighbours in a kind: embed job's index: of a "
                       "stored sample (--id), or of new images, texts or clips")
    p.add_argument("job", help="the embed job's folder (<output>/jobs/<id>)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", dest="sample_id", default=None, help="a stored sample's id")
    what.add_argument("--image", default=None, help="an image file")
    what.add_argument("--text", default=None, help="a text")
    what.add_argument("--audio", default=None, help="an audio file")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("recommend", help="a user's top items from a finished kind: recommend "
                       "job (its recommendations.parquet)")
    p.add_argument("job", help="the recommend job's folder (<output>/jobs/<id>)")
    p.add_argument("--user", required=True, help="a user id, as the interactions table has it")
    p.add_argument("-k", type=int, default=10, help="items per part (default 10)")
    p.add_argument("--part", choices=["both", "warm", "cold"], default="both",
                   help="warm items (collaborative), cold items (content), or both")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("predict", help="classify images (texts, clips) with a trained head: a few "
                       "files here, or a whole data set on the fleet (--data)")
    _add_broker(p)
    p.add_argument("model", help="a job folder (<output>/jobs/<id>) or a head .pt file")
    p.add_argument("images", nargs="*", help="image (or audio) files")
    p.add_argument("--classes", action="store_true", help="list the classes the model knows")
    p.add_argument("--data", default=None,
                   help="batch prediction on the fleet: a folder of images, a table "
                        "(CSV/JSONL/Parquet: image paths, or texts for a text model), a "
                        "WebDataset tar, or digits; writes predictions.parquet + .csv")
    p.add_argument("--source", default=None,
                   help="with --data: the data source kind when the guess is wrong "
                        "(images, imagefolder, manifest, text, webdataset, ...)")
    p.add_argument("--head", default="primary", help="with --data: primary, linear, mlp, knn")
    p.add_argument("--output", default=None,
                   help="with --data: output root (default: the model job's)")
    p.add_argument("--wait", action="store_true", help="with --data: wait and summarize")
    p.add_argument("--local", action="store_true",
                   help="with --data: run on this machine (private Redis + workers; waits)")
    p.add_argument("--extract-workers", type=int, default=2,
                   help="with --local: extraction worker processes")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    p.add_argument("--audio", action="append", default=[], metavar="FILE",
                   help="an audio file to classify (repeatable; the same as giving it as a "
                        "file argument)")
    p.add_argument("--text", action="append", default=[],
                   help="a text to classify (repeat it for several)")
    p.add_argument("--text-file", default=None,
                   help="a UTF-8 file with one text per line ('-': standard input)")
    p.add_argument("--top", type=positive_int, default=3, help="show the top k classes")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("cache", help="inspect, verify and clean the feature store")
    p.add_argument("action", choices=["ls", "verify", "rm"])
    p.add_argument("selector", nargs="?", default=None,
                   help="with rm: a shard set (backbone/key) or a prefix of one")
    p.add_argument("--store", default="featurefleet-out/store", help="feature store folder")
    p.add_argument("--fix", action="store_true", help="with verify: delete bad files")
    p.add_argument("--all", action="store_true", help="with rm: remove every shard set")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("dashboard", help="start Flower (authentication required)")
    _add_broker(p)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--auth", default=None,
                   help="user:password for basic auth (default $FEATUREFLEET_FLOWER_AUTH)")
    p.add_argument("--no-auth-on-loopback", action="store_true",
                   help="allow no authentication, only on a loopback address")
    p.add_argument("--read-only", action="store_true", help="disable Flower's control actions")

    p = sub.add_parser("exporter", help="Prometheus metrics of the fleet on /metrics")
    _add_broker(p)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9808)

    p = sub.add_parser("watchdog", help="fail jobs past their deadline, re-dispatch stalled ones")
    _add_broker(p)
    p.add_argument("--every", type=float, default=30.0, help="seconds between checks")
    p.add_argument("--stall", type=float, default=120.0,
                   help="seconds without progress (and no task queued) before re-dispatching")
    p.add_argument("--once", action="store_true", help="check once and exit")
    p.add_argument("--recover", action="append", default=[], metavar="DIR",
                   help="also recover lost jobs (plan on disk, no record in Redis) under "
                        "DIR (<output>/jobs); repeatable")

    p = sub.add_parser("jobs", help="list recent jobs")
    _add_broker(p)
    p.add_argument("-n", type=int, default=20, help="how many")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse prints the error and the usage)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use e.g. 3") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1; use e.g. 3")
    return value


def _add_no_quality(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-quality", action="store_true",
                   help="skip the data-quality stage (quality.enabled: false)")
