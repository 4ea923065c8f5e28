"""The ``featurefleet`` command line: demo, worker, submit, status, watch, report, jobs.

Every verb maps onto the Python API; a :class:`FeaturefleetError` ends the command with one
line (``featurefleet: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline.client import recommending
from pipeline.client.console import (
    CompareProgress,
    ProgressLine,
    format_leaderboard,
    summary,
)
from pipeline.client.parser import build_parser
from pipeline.client.predicting import predict
from pipeline.client.running import (
    interruptible,
    print_report_paths,
    run_local,
    wait_and_summarize,
)
from pipeline.errors import FeaturefleetError
from pipeline.jobs.progress import format_progress
from pipeline.settings import BROKER_ENV, FLOWER_AUTH_ENV
from pipeline.spec import JobSpec


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own flags; see benchmarks/harness.py
        from benchmarks import harness

        return int(harness.main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(_VERBS[args.verb](args) or 0)
    except FeaturefleetError as exc:
        print(f"featurefleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfeaturefleet: interrupted", file=sys.stderr)
        return 130


# --- verbs --------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from pipeline.spec import BackboneSpec, DataSpec

    out = Path(args.output).resolve()
    spec = JobSpec(
        name="demo-digits-efficientnet_lite0",
        data=DataSpec(source="digits", shard_size=args.shard_size, limit=args.limit),
        backbone=BackboneSpec(name="efficientnet_lite0", image_size=args.image_size),
        output=str(out), store=str(out / "store"))
    what = "sklearn digits, efficientnet_lite0 (ImageNet), linear probe"
    if args.data == "text":
        from pipeline.client.debian import write_debian_csv

        csv_path = write_debian_csv(out / "debian-packages.csv", per_class=200)
        spec = spec.replace(name="demo-debian-minilm", data={
            "source": "text", "path": str(csv_path)}, backbone={
            "name": "all-minilm-l6-v2", "image_size": None, "max_length": 128})
        what = (f"Debian package descriptions by section ({csv_path.name}), all-MiniLM-L6-v2, "
                "linear probe")
    if args.data == "speech":
        from pipeline.client.speech import CREDIT, fsdd_manifest

        manifest = fsdd_manifest(args.path, out / "fsdd", args.task)
        backbone = args.backbone or "resemblyzer"
        spec = spec.replace(name=f"demo-fsdd-{args.task}-{backbone}", data={
            "source": "manifest", "path": str(manifest), "shard_size": 500},
            backbone={"name": backbone, "image_size": None})
        what = f"{CREDIT}: {args.task}, {backbone}, linear probe"
    elif args.backbone:
        raise FeaturefleetError("--backbone is for --data speech; fix: use featurefleet run "
                                "with a job file to pick another backbone")
    if args.data == "recommend":
        minilm = {"name": "all-minilm-l6-v2", "image_size": None, "max_length": 128}
        if args.movielens:
            items, section = recommending.movielens(args.movielens, out / "movielens")
            spec = spec.replace(name="demo-movielens-minilm", kind="recommend", data={
                "source": "text", "path": str(items), "shard_size": 2000}, backbone=minilm,
                recommend=section)
            what = f"MovieLens ({args.movielens}): movies by title and genres, all-MiniLM-L6-v2"
        else:
            items, inter = recommending.write_simulated(out / "recommend")
            spec = spec.replace(name="demo-recommend-SIMULATED", kind="recommend", data={
                "source": "text", "path": str(items), "shard_size": 600}, backbone=minilm,
                recommend={"interactions": str(inter), "items_id_column": "package"})
            what = ("recommendation on SIMULATED users: Debian packages as items (their "
                    "descriptions, all-MiniLM-L6-v2), popularity / EASE / content models")
    elif args.movielens:
        raise FeaturefleetError("--movielens is for --data recommend; fix: featurefleet demo "
                                "--data recommend --movielens DIR")
    if args.no_quality:
        spec = spec.replace(quality={"enabled": False})
    return run_local(spec, what, "demo", args.extract_workers, args.timeout)


def _run(args: argparse.Namespace) -> int:
    spec = JobSpec.from_file(args.spec)
    if args.kind:
        spec = spec.replace(kind=args.kind)
    if args.no_quality:
        spec = spec.replace(quality={"enabled": False})
    nodes = spec.pretrain.nodes if spec.kind == "pretrain" else (
        spec.finetune.nodes if spec.strategy == "finetune" else 1)
    what = (f"{spec.kind} job {spec.name!r}: {spec.data.source} data, "
            f"{spec.backbone.name} backbone")
    return run_local(spec, what, "run", max(args.extract_workers, nodes), args.timeout)


def _worker(args: argparse.Namespace) -> int:
    import socket

    from pipeline.jobs.broker import broker_url, connect
    from workers.launcher import ROOT, WORKER_ENV, worker_argv

    url = broker_url(args.broker)
    connect(url).close()  # a clear error now instead of a retry loop in the worker
    if args.gpus is not None:
        from workers.fleet import run_fleet

        return int(run_fleet(url, args.gpus, args.cpu_workers, args.extract_workers,
                             loglevel=args.loglevel))
    name = args.name or f"worker-{os.getpid()}@{socket.gethostname()}"
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    os.environ[BROKER_ENV] = url
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    argv = worker_argv(queues, args.concurrency, name, loglevel=args.loglevel)
    os.execv(argv[0], argv)  # become the Celery worker process itself
    return 0  # pragma: no cover


def _export_findings(args: argparse.Namespace) -> int:
    """``featurefleet quality JOB --export FILE``: every finding of a finished job."""
    import shutil

    from pipeline.client.api import Job

    where = Path(args.spec).expanduser()
    job_dir = where if where.is_dir() else Path(Job(args.spec, args.broker).status()["job_dir"])
    found = job_dir / "flagged.csv"
    if not found.is_file():
        raise FeaturefleetError(f"job folder {str(job_dir)!r} has no findings (flagged.csv): "
                                "the quality stage did not run there, or the job has not "
                                "finished; fix: featurefleet quality job.yaml --wait, or a "
                                "probe job with quality enabled")
    rows = max(0, len(found.read_text(encoding="utf-8").splitlines()) - 1)
    if args.export == "-":
        sys.stdout.write(found.read_text(encoding="utf-8"))
    else:
        shutil.copyfile(found, args.export)
        print(f"{rows} finding(s) written to {args.export}; review them, then list the samples "
              "to leave out with quality.exclude_file: FILE and run the job again")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipeline.client.api import missing_consumers, submit
    from pipeline.spec import JobSpec

    if getattr(args, "export", None):
        return _export_findings(args)
    spec = JobSpec.from_file(args.spec)
    if args.verb in ("pretrain", "quality"):
        spec = spec.replace(kind=args.verb)
    if getattr(args, "no_quality", False):
        spec = spec.replace(quality={"enabled": False})
    job = submit(spec, broker=args.broker)
    print(job.id, flush=True)
    idle = missing_consumers(job, args.broker)
    if idle:
        print(f"featurefleet: warning: no worker consumes {', '.join(idle)}: job {job.id} "
              "waits until one starts (featurefleet worker --queues "
              f"{','.join(idle)})", file=sys.stderr, flush=True)
    return wait_and_summarize(job, args.timeout) if args.wait else 0


def _compare(args: argparse.Namespace) -> int:
    import contextlib

    from pipeline.client.compare import compare
    from pipeline.spec import JobSpec
    from workers.launcher import local_cluster

    spec = JobSpec.from_file(args.spec)
    names = [b for b in args.backbones.split(",") if b.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    with contextlib.ExitStack() as stack:
        broker = args.broker
        if args.local:
            interruptible()
            out = Path(spec.output).resolve()
            cluster = stack.enter_context(local_cluster(out / "cluster", args.extract_workers))
            broker = cluster.broker
        cmp = compare(spec, names, strategies, broker=broker)
        print(f"{cmp.id}: jobs {', '.join(cmp.status()['jobs'])}", flush=True)
        if not (args.wait or args.local):
            return 0
        board = cmp.wait(timeout=args.timeout, on_progress=CompareProgress(cmp.jobs.get))
        path = cmp.status()["leaderboard"]
    print(format_leaderboard(board))
    print(f"leaderboard: {path} (and .html)")
    return 0 if all(r["status"] == "SUCCESS" for r in board["rows"]) else 1


def _status(args: argparse.Namespace) -> int:
    from pipeline.client.api import Job, queue_consumers
    from workers.settings import QUEUES

    st = Job(args.job_id, args.broker).status()
    consumers = queue_consumers(args.broker)
    st["workers"] = {q: consumers.get(q, []) for q in QUEUES}
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(format_progress(st))
    for key in ("name", "backbone", "job_dir", "report", "error"):
        if st.get(key):
            print(f"  {key}: {st[key]}")
    for q, names in st["workers"].items():
        print(f"  workers on {q}: {', '.join(names) if names else 'none online'}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from pipeline.client.api import Job

    st = Job(args.job_id, args.broker).wait(on_progress=ProgressLine(sys.stdout))
    if st["status"] != "SUCCESS":
        return 1
    print_report_paths(st)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.client.api import Job

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
    from pipeline.jobs.broker import connect
    from pipeline.jobs.records import JobStore

    for st in JobStore(connect(args.broker)).recent(args.n):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(st.get("created", 0))))
        top1 = f"top1 {st['top1']:.4f}" if st.get("top1") is not None else ""
        print(f"{st['id']}  {when}  {st['status']:9} {st.get('name', '')[:30]:30} "
              f"{st.get('images_done', 0)}/{st.get('images_total', 0)} images  {top1}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from pipeline.backbones import describe_input
    from pipeline.store import cache

    if args.action == "ls":
        sets = cache.ls(args.store)
        if args.json:
            print(json.dumps(sets, indent=2))
        for s in [] if args.json else sets:
            print(f"{s['set']:<45} {s['shards']:4d} shards {s['rows']:8d} rows "
                  f"{s['bytes'] / 1e6:8.1f} MB  {s['source'] or '?'} "
                  f"@{describe_input(s['preprocessing'])}")
        return 0
    if args.action == "verify":
        problems = cache.verify(args.store, fix=args.fix)
        if args.json:
            print(json.dumps(problems, indent=2))
        for p in [] if args.json else problems:
            print(f"{'removed' if p['removed'] else 'BAD'}  {p['path']}: {p['problem']}")
        if not args.json:
            print(f"{len(problems)} problem(s)" if problems else "all shards verified")
        return 1 if problems and not args.fix else 0  # --json too: scripts read the status
    for name in cache.rm(args.store, args.selector, args.all):
        print(f"removed {name}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from pipeline.jobs.broker import broker_url, connect
    from workers.dashboard import dashboard, enable_task_events

    url = broker_url(args.broker)
    argv, env = dashboard(url, args.address, args.port,
                          args.auth or os.environ.get(FLOWER_AUTH_ENV),
                          args.no_auth_on_loopback, args.read_only)
    connect(url).close()
    workers = enable_task_events(url)  # Flower asks again every 5 s (workers started later)
    print(f"featurefleet: Flower on http://{args.address}:{args.port}/ (jobs: /jobs, tasks: "
          f"/tasks, metrics: /metrics); {workers} worker(s) online sending task events",
          flush=True)
    os.execve(argv[0], argv, env)
    return 0  # pragma: no cover


def _exporter(args: argparse.Namespace) -> int:
    import threading

    from pipeline.client.exporter import LOOPBACK, serve
    from pipeline.jobs.broker import connect
    from pipeline.jobs.records import JobStore

    serve(JobStore(connect(args.broker, patient=True)), args.address, args.port)
    print(f"featurefleet: metrics on http://{args.address}:{args.port}/metrics", flush=True)
    if args.address not in LOOPBACK:
        print(f"featurefleet: warning: {args.address} is reachable beyond this machine; the "
              "metrics have no authentication (put a firewall or an authenticating proxy in "
              "front)", file=sys.stderr, flush=True)
    threading.Event().wait()
    return 0


def _watchdog(args: argparse.Namespace) -> int:
    from pipeline.client import watchdog

    watchdog.run(args.broker, every=args.every, stall_s=args.stall, once=args.once,
                 recover=[Path(d) for d in args.recover])
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from pipeline.client.api import Job

    job = Job(args.job_id, args.broker)
    if job.cancel():
        print(f"cancelled {job.id}")
        return 0
    print(f"job {job.id} had already ended: {job.status()['status']}")
    return 1


def _retry(args: argparse.Namespace) -> int:
    from pipeline.client.api import Job, recover

    if args.job_dir:
        job = recover(args.job_dir, args.broker, expect_id=args.job_id)
        print(f"recovered {job.id}")
        return 0
    print(Job(args.job_id, args.broker).retry().id)
    return 0


def _search(args: argparse.Namespace) -> int:
    from pipeline.embed import Searcher

    if not 1 <= args.k <= 10_000:
        raise FeaturefleetError(f"-k {args.k} is out of range; fix: ask for 1 to 10000 "
                                "neighbours")
    searcher = Searcher(args.job)
    if args.sample_id is not None:
        got = searcher.by_id(args.sample_id, args.k)
    else:
        asked = "text" if args.text is not None else "image" if args.image else "audio"
        modality = searcher.modality
        if asked != modality:
            raise FeaturefleetError(f"this index embeds {modality} samples, not {asked}; fix: "
                                    f"search it with --{modality} (or --id ID)")
        query = args.text if args.text is not None else (args.image or args.audio)
        got = searcher.by_samples([query], args.k)[0]
    if args.json:
        print(json.dumps(got, indent=2))
        return 0
    for n in got:
        label = f"  {n['label']}" if n["label"] is not None else ""
        print(f"{n['rank']:4d}  {n['similarity']:.4f}  {n['sample_id']}{label}")
    return 0


_VERBS = {"cache": _cache, "cancel": _cancel, "compare": _compare, "dashboard": _dashboard,
          "demo": _demo, "exporter": _exporter, "jobs": _jobs, "predict": predict,
          "pretrain": _submit, "quality": _submit, "report": _report, "retry": _retry, "run": _run,
          "recommend": recommending.recommend_command, "search": _search,
          "status": _status, "submit": _submit, "watch": _watch, "watchdog": _watchdog,
          "worker": _worker}

if __name__ == "__main__":
    sys.exit(main())
