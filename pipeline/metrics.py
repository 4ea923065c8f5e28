"""Prometheus metrics of the fleet, read from Redis: ``featurefleet exporter``.

Flower's ``/metrics`` covers Celery (task runtimes, events, workers online); this adds what
Flower cannot see: images extracted, shard durations, failures, queue lengths per queue and
jobs by status. Scrape config::

    scrape_configs:
      - job_name: featurefleet
        static_configs: [{targets: ["exporter-host:9808"]}]
      - job_name: flower
        basic_auth: {username: ops, password: ...}
        static_configs: [{targets: ["flower-host:5555"]}]
"""

from __future__ import annotations

from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.state import FINAL, METRICS_KEY, SHARD_BUCKETS, STATUSES, JobStore

QUEUES = ("ff.extract", "ff.train")


def render(jobs: JobStore) -> str:
    """The metrics in Prometheus' text format."""
    r = jobs.r
    m = {k: float(v) for k, v in (r.hgetall(METRICS_KEY) or {}).items()}
    lines = [
        "# HELP featurefleet_images_extracted_total Images run through a backbone.",
        "# TYPE featurefleet_images_extracted_total counter",
        f"featurefleet_images_extracted_total {m.get('images_extracted', 0):g}",
        "# HELP featurefleet_images_skipped_total Samples that could not be decoded.",
        "# TYPE featurefleet_images_skipped_total counter",
        f"featurefleet_images_skipped_total {m.get('images_skipped', 0):g}",
        "# HELP featurefleet_jobs_failed_total Jobs that ended FAILED.",
        "# TYPE featurefleet_jobs_failed_total counter",
        f"featurefleet_jobs_failed_total {m.get('jobs_failed', 0):g}",
        "# HELP featurefleet_shard_seconds Extraction time per shard.",
        "# TYPE featurefleet_shard_seconds histogram",
    ]
    cumulative = 0.0
    for b in SHARD_BUCKETS:
        cumulative += m.get(f"shard_seconds_le_{b:g}", 0)
        lines.append(f'featurefleet_shard_seconds_bucket{{le="{b:g}"}} {cumulative:g}')
    cumulative += m.get("shard_seconds_le_inf", 0)
    lines += [f'featurefleet_shard_seconds_bucket{{le="+Inf"}} {cumulative:g}',
              f"featurefleet_shard_seconds_sum {m.get('shard_seconds_sum', 0):g}",
              f"featurefleet_shard_seconds_count {cumulative:g}",
              "# HELP featurefleet_queue_length Messages waiting per queue.",
              "# TYPE featurefleet_queue_length gauge"]
    lines += [f'featurefleet_queue_length{{queue="{q}"}} {r.llen(q)}' for q in QUEUES]
    lines += ["# HELP featurefleet_unacked_messages Messages reserved by workers, not acked.",
              "# TYPE featurefleet_unacked_messages gauge",
              f"featurefleet_unacked_messages {r.hlen('unacked')}",
              "# HELP featurefleet_jobs Recent jobs by status.",
              "# TYPE featurefleet_jobs gauge"]
    counts: Counter[str] = Counter(str(j.get("status")) for j in jobs.recent(1000))
    lines += [f'featurefleet_jobs{{status="{s}"}} {counts.get(s, 0)}' for s in STATUSES]
    pending = sum(int(j.get("images_total", 0)) - int(j.get("images_done", 0))
                  for j in jobs.recent(1000) if j.get("status") not in FINAL)
    lines += ["# HELP featurefleet_images_pending Images not yet extracted in unfinished jobs.",
              "# TYPE featurefleet_images_pending gauge", f"featurefleet_images_pending {pending}"]
    return "\n".join(lines) + "\n"


def serve(jobs: JobStore, address: str = "127.0.0.1", port: int = 9808) -> ThreadingHTTPServer:
    """An HTTP server answering ``/metrics`` (call ``serve_forever`` on it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render(jobs).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes every 15 s: keep logs quiet
            pass

    return ThreadingHTTPServer((address, port), Handler)
