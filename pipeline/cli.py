"""The ``featurefleet`` command line: demo, worker, submit, status, watch, report, jobs.

Every verb maps onto the Python API; a :class:`FeaturefleetError` ends the command with one
line (``featurefleet: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import FeaturefleetError
from pipeline.state import BROKER_ENV, FINAL


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
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the weights' own, 224 for efficientnet_lite0)")
    p.add_argument("--shard-size", type=int, default=300, help="images per extraction task")
    p.add_argument("--limit", type=int, default=None, help="use only N digits (smoke test)")
    p.add_argument("--extract-workers", type=int, default=1, help="extraction worker processes")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")

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

    p = sub.add_parser("submit", help="enqueue a job from a YAML/JSON spec; print its id")
    _add_broker(p)
    p.add_argument("spec", help="job spec file (.yaml/.yml/.json)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its metrics")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait")

    for verb, text in (("cancel", "cancel a job (queued shards revoked, running ones stopped)"),
                       ("retry", "run a failed job again (cached shards are reused)"),
                       ("status", "show a job's state and progress"),
                       ("watch", "follow a job's progress until it ends"),
                       ("report", "show a finished job's metrics and report path")):
        p = sub.add_parser(verb, help=text)
        _add_broker(p)
        p.add_argument("job_id")
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

    p = sub.add_parser("predict", help="classify images with a trained head")
    p.add_argument("model", help="a job folder (<output>/jobs/<id>) or a head .pt file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=3, help="show the top k classes")
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

    p = sub.add_parser("jobs", help="list recent jobs")
    _add_broker(p)
    p.add_argument("-n", type=int, default=20, help="how many")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own flags; see pipeline/bench.py
        from pipeline import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(_VERBS[args.verb](args) or 0)
    except FeaturefleetError as exc:
        print(f"featurefleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfeaturefleet: interrupted", file=sys.stderr)
        return 130


# --- progress -----------------------------------------------------------------------------


class ProgressLine:
    """A one-line progress bar from the job record (rewritten in place on a terminal)."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""
        self.last_time = 0.0

    def __call__(self, st: dict[str, Any]) -> None:
        line = format_progress(st)
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


def format_progress(st: dict[str, Any]) -> str:
    if st.get("strategy") == "finetune":
        return _finetune_progress(st)
    total = int(st.get("images_total") or 0)
    done = min(int(st.get("images_done") or 0), total)
    width = 24
    fill = int(width * done / total) if total else 0
    started = st.get("started")
    rate = eta = ""
    if started and done:
        elapsed = (st.get("extract_finished") or time.time()) - float(started)
        if elapsed > 0:
            ips = done / elapsed
            rate = f"  {ips:6.1f} img/s"
            if done < total and ips > 0:
                eta = f"  ETA {int((total - done) / ips)}s"
    skipped = int(st.get("images_skipped") or 0)
    fails = f"  skipped {skipped}" if skipped else ""
    return (f"[{'#' * fill}{'-' * (width - fill)}] {st.get('status', '?'):8} "
            f"{st.get('stage', ''):8} shards {st.get('shards_done', 0)}/"
            f"{int(st.get('shards_total', 0)) - int(st.get('shards_cached', 0))} "
            f"(+{st.get('shards_cached', 0)} cached)  images {done}/{total}{rate}{eta}{fails}")


def _finetune_progress(st: dict[str, Any]) -> str:
    p = st.get("finetune") or {}
    epochs, steps = int(p.get("epochs") or 0), int(p.get("steps") or 0)
    done = (int(p.get("epoch") or 1) - 1) * steps + int(p.get("step") or 0) if steps else 0
    width = 24
    fill = int(width * done / (epochs * steps)) if epochs and steps else 0
    val = p.get("val_top1")
    resumes = int(st.get("resumes") or 0)
    return (f"[{'#' * fill}{'-' * (width - fill)}] {st.get('status', '?'):8} "
            f"{st.get('stage', ''):8} epoch {p.get('epoch', 0)}/{epochs} step "
            f"{p.get('step', 0)}/{steps}  loss {p.get('loss', '-')}  val top-1 "
            f"{'-' if val is None else f'{val:.3f}'}  {p.get('images_per_s') or 0:.1f} img/s"
            + (f"  resumed {resumes}x" if resumes else ""))


def _finetune_rows(ft: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not ft:
        return []
    resumes = "; ".join(f"{r['reason']} at epoch {r['epoch'] + 1} step {r['step']}"
                        for r in ft.get("resumes", []))
    return [("fine-tuning", f"{ft['epochs']} epochs on {ft['device']}, best epoch "
                            f"{ft['best_epoch']} (val top-1 {ft['best_val_top1']:.4f})"),
            *([("resumed", resumes)] if resumes else [])]


def summary(rep: dict[str, Any]) -> str:
    m = rep["metrics"]
    t = rep["timings"]
    rows = [
        ("job", f"{rep['job_id']} ({rep['name']})"),
        ("backbone", f"{rep['backbone']['name']} [{rep['backbone']['weights_id']}] "
                     f"@{rep['backbone']['preprocessing']['crop']}px"),
        ("data", f"{rep['data']['source']}: " + ", ".join(
            f"{k} {v}" for k, v in rep["data"]["split_sizes"].items())),
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
                       + (f", {t['extract_images_per_s']} img/s per task"
                          if t["extract_images_per_s"] else "")),
        ("train / evaluate", f"{t['train_s']} s / {t['evaluate_s']} s"),
        ("total", f"{t['total_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# --- verbs --------------------------------------------------------------------------------


def _interruptible() -> None:
    """Ctrl-C and SIGTERM (e.g. from a supervisor) stop a command that owns a private cluster
    and clean it up, also when it was started with SIGINT ignored (a shell's background job)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def _demo(args: argparse.Namespace) -> int:
    from pipeline.api import submit
    from pipeline.spec import BackboneSpec, DataSpec, JobSpec
    from workers.runtime import local_cluster

    out = Path(args.output).resolve()
    spec = JobSpec(
        name="demo-digits-efficientnet_lite0",
        data=DataSpec(source="digits", shard_size=args.shard_size, limit=args.limit),
        backbone=BackboneSpec(name="efficientnet_lite0", image_size=args.image_size),
        output=str(out), store=str(out / "store")).validate()
    _interruptible()
    print(f"featurefleet demo: starting a private Redis and {args.extract_workers} extraction + "
          f"1 training worker process (logs in {out / 'cluster' / 'logs'})", flush=True)
    with local_cluster(out / "cluster", extract_workers=args.extract_workers) as cluster:
        job = submit(spec, broker=cluster.broker)
        print(f"submitted job {job.id}: sklearn digits, efficientnet_lite0 (ImageNet), linear "
              "probe", flush=True)
        st = job.wait(timeout=args.timeout, on_progress=ProgressLine())
        if st["status"] != "SUCCESS":
            print(f"featurefleet: error: job {job.id} {st['status']}: {st.get('error')}",
                  file=sys.stderr)
            return 1
        rep = job.result()
    print(summary(rep))
    print(f"report: {st['report']}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import socket

    from pipeline.state import broker_url, connect
    from workers.runtime import ROOT, WORKER_ENV, worker_argv

    url = broker_url(args.broker)
    connect(url).close()  # a clear error now instead of a retry loop in the worker
    if args.gpus is not None:
        from workers.runtime import run_fleet

        return run_fleet(url, args.gpus, args.cpu_workers, args.extract_workers,
                         loglevel=args.loglevel)
    name = args.name or f"worker-{os.getpid()}@{socket.gethostname()}"
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    os.environ[BROKER_ENV] = url
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    argv = worker_argv(queues, args.concurrency, name, loglevel=args.loglevel)
    os.execv(argv[0], argv)  # become the Celery worker process itself
    return 0  # pragma: no cover


def _submit(args: argparse.Namespace) -> int:
    from pipeline.api import submit
    from pipeline.spec import JobSpec

    job = submit(JobSpec.from_file(args.spec), broker=args.broker)
    print(job.id, flush=True)
    if not args.wait:
        return 0
    st = job.wait(timeout=args.timeout, on_progress=ProgressLine())
    if st["status"] != "SUCCESS":
        print(f"featurefleet: error: job {job.id} {st['status']}: {st.get('error')}",
              file=sys.stderr)
        return 1
    print(summary(job.result()))
    print(f"report: {st['report']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import contextlib

    from pipeline.compare import compare
    from pipeline.spec import JobSpec
    from workers.runtime import local_cluster

    spec = JobSpec.from_file(args.spec)
    names = [b for b in args.backbones.split(",") if b.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    with contextlib.ExitStack() as stack:
        broker = args.broker
        if args.local:
            _interruptible()
            out = Path(spec.output).resolve()
            cluster = stack.enter_context(local_cluster(out / "cluster", args.extract_workers))
            broker = cluster.broker
        cmp = compare(spec, names, strategies, broker=broker)
        print(f"{cmp.id}: jobs {', '.join(cmp.status()['jobs'])}", flush=True)
        if not (args.wait or args.local):
            return 0
        board = cmp.wait(timeout=args.timeout)
        path = cmp.status()["leaderboard"]
    print(format_leaderboard(board))
    print(f"leaderboard: {path} (and .html)")
    return 0 if all(r["status"] == "SUCCESS" for r in board["rows"]) else 1


def format_leaderboard(board: dict[str, Any]) -> str:
    cols = [("rank", "#"), ("backbone", "backbone"), ("weights", "weights"),
            ("strategy", "strategy"), ("val_top1", "val"), ("test_top1", "test"),
            ("extract_images_per_s", "extract img/s"), ("train_images_per_s", "train img/s"),
            ("train_s", "train s"),
            ("feature_dim", "dim"), ("parameters", "params"), ("status", "status")]

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and v <= 1 else ("-" if v is None else str(v))

    rows = [[h for _, h in cols]] + [[cell(r.get(k)) for k, _ in cols] for r in board["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows)


def _status(args: argparse.Namespace) -> int:
    from pipeline.api import Job

    st = Job(args.job_id, args.broker).status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(format_progress(st))
    for key in ("name", "backbone", "job_dir", "report", "error"):
        if st.get(key):
            print(f"  {key}: {st[key]}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from pipeline.api import Job

    st = Job(args.job_id, args.broker).wait(on_progress=ProgressLine(sys.stdout))
    return 0 if st["status"] == "SUCCESS" else 1


def _report(args: argparse.Namespace) -> int:
    from pipeline.api import Job

    job = Job(args.job_id, args.broker)
    rep = job.result()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(summary(rep))
    path = Path(job.status()["report"])
    print(f"report: {path}\nhtml:   {path.with_suffix('.html')}")
    if args.open:
        import webbrowser

        webbrowser.open(path.with_suffix(".html").resolve().as_uri())
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from pipeline.state import JobStore, connect

    for st in JobStore(connect(args.broker)).recent(args.n):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(st.get("created", 0))))
        top1 = f"top1 {st['top1']:.4f}" if st.get("top1") is not None else ""
        print(f"{st['id']}  {when}  {st['status']:9} {st.get('name', '')[:30]:30} "
              f"{st.get('images_done', 0)}/{st.get('images_total', 0)} images  {top1}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline.predict import load_classifier

    clf = load_classifier(args.model)
    results = clf.predict(args.images, top=args.top)
    if args.json:
        print(json.dumps([{"image": i, **r} for i, r in zip(args.images, results, strict=True)],
                         indent=2))
        return 0
    for image, r in zip(args.images, results, strict=True):
        top = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"])
        print(f"{image}: {r['label']} ({r['probability']:.3f})   top: {top}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from pipeline import cache

    if args.action == "ls":
        sets = cache.ls(args.store)
        if args.json:
            print(json.dumps(sets, indent=2))
        for s in [] if args.json else sets:
            print(f"{s['set']:<45} {s['shards']:4d} shards {s['rows']:8d} rows "
                  f"{s['bytes'] / 1e6:8.1f} MB  {s['source'] or '?'} @{s['crop']}px")
        return 0
    if args.action == "verify":
        problems = cache.verify(args.store, fix=args.fix)
        if args.json:
            print(json.dumps(problems, indent=2))
        for p in [] if args.json else problems:
            print(f"{'removed' if p['removed'] else 'BAD'}  {p['path']}: {p['problem']}")
        if not args.json:
            print(f"{len(problems)} problem(s)" if problems else "all shards verified")
        return 1 if problems and not args.fix else 0
    for name in cache.rm(args.store, args.selector, args.all):
        print(f"removed {name}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from pipeline.state import broker_url, connect
    from workers.runtime import FLOWER_AUTH_ENV, dashboard

    url = broker_url(args.broker)
    argv, env = dashboard(url, args.address, args.port,
                          args.auth or os.environ.get(FLOWER_AUTH_ENV),
                          args.no_auth_on_loopback, args.read_only)
    connect(url).close()
    from workers.runtime import enable_task_events

    workers = enable_task_events(url)  # Flower asks again every 5 s (workers started later)
    print(f"featurefleet: Flower on http://{args.address}:{args.port}/ (tasks: /tasks, "
          f"metrics: /metrics); {workers} worker(s) online sending task events", flush=True)
    os.execve(argv[0], argv, env)
    return 0  # pragma: no cover


def _exporter(args: argparse.Namespace) -> int:
    from pipeline.metrics import serve
    from pipeline.state import JobStore, connect

    server = serve(JobStore(connect(args.broker, patient=True)), args.address, args.port)
    print(f"featurefleet: metrics on http://{args.address}:{args.port}/metrics", flush=True)
    server.serve_forever()
    return 0


def _watchdog(args: argparse.Namespace) -> int:
    from pipeline import watchdog

    watchdog.run(args.broker, every=args.every, stall_s=args.stall, once=args.once)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from pipeline.api import Job

    job = Job(args.job_id, args.broker)
    if job.cancel():
        print(f"cancelled {job.id}")
        return 0
    print(f"job {job.id} had already ended: {job.status()['status']}")
    return 1


def _retry(args: argparse.Namespace) -> int:
    from pipeline.api import Job

    print(Job(args.job_id, args.broker).retry().id)
    return 0


_VERBS = {"cache": _cache, "cancel": _cancel, "compare": _compare, "dashboard": _dashboard,
          "demo": _demo,
          "exporter": _exporter, "jobs": _jobs, "predict": _predict, "report": _report,
          "retry": _retry, "status": _status, "submit": _submit, "watch": _watch,
          "watchdog": _watchdog, "worker": _worker}

if __name__ == "__main__":
    sys.exit(main())
