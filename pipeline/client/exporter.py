"""Prometheus metrics of the fleet, read from Redis at scrape time: ``featurefleet exporter``.

Flower's ``/metrics`` covers Celery (task runtimes, events, workers online); this adds what
Flower cannot see: images extracted, shard durations, failures, queue lengths per queue and
jobs by status. Built on ``prometheus_client`` (a custom collector). Scrape config::

    scrape_configs:
      - job_name: featurefleet
        static_configs: [{targets: ["exporter-host:9808"]}]
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pipeline.jobs.records import FINAL, METRICS_KEY, SHARD_BUCKETS, STATUSES, JobStore

log = logging.getLogger(__name__)
QUEUES = ("ff.extract", "ff.train")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class FleetCollector:
    """A prometheus_client collector: one consistent read of the fleet's counters per scrape."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        r = self.jobs.r
        m = {k: float(v) for k, v in (r.hgetall(METRICS_KEY) or {}).items()}
        for name, key, text in (
                ("featurefleet_images_extracted", "images_extracted",
                 "Images run through a backbone."),
                ("featurefleet_images_skipped", "images_skipped",
                 "Samples that could not be decoded."),
                ("featurefleet_jobs_failed", "jobs_failed", "Jobs that ended FAILED.")):
            yield CounterMetricFamily(name, text, value=m.get(key, 0.0))
        buckets, cumulative = [], 0.0
        for b in SHARD_BUCKETS:
            cumulative += m.get(f"shard_seconds_le_{b:g}", 0.0)
            buckets.append((f"{b:g}", cumulative))
        cumulative += m.get("shard_seconds_le_inf", 0.0)
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily("featurefleet_shard_seconds", "Extraction time per shard.",
                                    buckets=buckets, sum_value=m.get("shard_seconds_sum", 0.0))
        queue = GaugeMetricFamily("featurefleet_queue_length", "Messages waiting per queue.",
                                  labels=["queue"])
        for q in QUEUES:
            queue.add_metric([q], r.llen(q))
        yield queue
        yield GaugeMetricFamily("featurefleet_unacked_messages",
                                "Messages reserved by workers, not acked.",
                                value=r.hlen("unacked"))
        recent = self.jobs.recent(1000)
        counts: Counter[str] = Counter(str(j.get("status")) for j in recent)
        by_status = GaugeMetricFamily("featurefleet_jobs", "Recent jobs by status.",
                                      labels=["status"])
        for s in STATUSES:
            by_status.add_metric([s], counts.get(s, 0))
        yield by_status
        pending = sum(int(j.get("images_total", 0)) - int(j.get("images_done", 0))
                      for j in recent if j.get("status") not in FINAL)
        yield GaugeMetricFamily("featurefleet_images_pending",
                                "Images not yet extracted in unfinished jobs.", value=pending)


def registry(jobs: JobStore) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(jobs))  # type: ignore[arg-type]
    return reg


def render(jobs: JobStore) -> str:
    """The metrics in Prometheus' text format."""
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry(jobs))).decode()


def serve(jobs: JobStore, address: str = "127.0.0.1", port: int = 9808) -> Any:
    """Serve ``/metrics`` on ``address:port`` (a thread); returns the server. A non-loopback
    address is logged: the metrics name jobs and queues."""
    from prometheus_client import start_http_server

    if address not in LOOPBACK:
        log.warning("exporter listens on %s:%d, beyond this machine: put it behind a firewall "
                    "or a reverse proxy with authentication", address, port)
    server, _thread = start_http_server(port, addr=address, registry=registry(jobs))
    return server
