"""Running a job and waiting for it, as the verbs do: a private cluster on this machine
(``run``, ``demo``, ``predict --local``), the wait with its progress line, the summary and
the report paths at the end."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from pipeline.client.console import ProgressLine, summary
from pipeline.spec import JobSpec


def interruptible() -> None:
    """Ctrl-C and SIGTERM (e.g. from a supervisor) stop a command that owns a private cluster
    and clean it up, also when it was started with SIGINT ignored (a shell's background job)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def run_local(spec: JobSpec, what: str, verb: str, extract_workers: int,
               timeout: float | None) -> int:
    """Run ``spec`` on this machine: a private Redis and worker processes under
    ``<output>/cluster`` (logs there), the progress line, the summary, the report paths;
    nothing is left running when it ends (Ctrl-C and SIGTERM included)."""
    from pipeline.client.api import submit
    from workers.launcher import local_cluster

    out = Path(spec.output).resolve()
    interruptible()
    print(f"featurefleet {verb}: starting a private Redis and {extract_workers} extraction + "
          f"1 training worker process (logs in {out / 'cluster' / 'logs'})", flush=True)
    with local_cluster(out / "cluster", extract_workers=extract_workers) as cluster:
        job = submit(spec, broker=cluster.broker)
        print(f"submitted job {job.id}: {what}", flush=True)
        st = job.wait(timeout=timeout, on_progress=ProgressLine())
        if st["status"] != "SUCCESS":
            print(f"featurefleet: error: job {job.id} {st['status']}: {st.get('error')}",
                  file=sys.stderr)
            return 1
        rep = job.result()
    print(summary(rep))
    print_report_paths(st)
    return 0


def print_report_paths(st: dict[str, Any]) -> None:
    report = Path(st["report"])
    print(f"report: {report}")
    if report.with_suffix(".html").is_file():
        print(f"page:   {report.with_suffix('.html')}")


def wait_and_summarize(job: Any, timeout: float | None) -> int:
    """Wait with the progress line; then the summary and the report paths (or the error)."""
    st = job.wait(timeout=timeout, on_progress=ProgressLine())
    if st["status"] != "SUCCESS":
        print(f"featurefleet: error: job {job.id} {st['status']}: {st.get('error')}",
              file=sys.stderr)
        return 1
    print(summary(job.result()))
    print_report_paths(st)
    return 0
