"""Celery settings for featurefleet, each with the reason it is set.

``celery_config(url)`` gives the settings for a broker URL; the worker app loads this module
lazily (``config_from_object``), reading the URL from $FEATUREFLEET_BROKER_URL then. Module
attributes are Celery setting names, so nothing else here may be named like one.
"""

from __future__ import annotations

from typing import Any

from pipeline import settings as ff_settings
from pipeline.jobs import broker

EXTRACT_QUEUE = "ff.extract"  # GPU (or CPU) workers that run the frozen backbone
TRAIN_QUEUE = "ff.train"  # CPU workers for classifier training and evaluation
QUEUES = (EXTRACT_QUEUE, TRAIN_QUEUE)


def celery_config(url: str | None = None) -> dict[str, Any]:
    """Celery settings for the broker at ``url`` (also used as the result backend)."""
    settings = ff_settings.get_settings()
    url = broker.broker_url(url)
    # The longest a single task may run: shards are sized to take minutes, not hours.
    time_limit = settings.task_time_limit
    # A task still running when the visibility timeout expires is delivered again while it
    # runs (celery#5935): by default twice the hard time limit, equal everywhere.
    visibility = settings.visibility
    # A message held by a lost host comes back once it is older than the visibility timeout,
    # when a live consumer next scans the unacked index: kombu scans every interval x
    # throttle seconds (10 x 10 by default); one cheap ZRANGEBYSCORE every 10 s instead.
    transport = {"visibility_timeout": visibility, "unacked_restore_interval": 10,
                 "unacked_restore_throttle": 1}
    events = settings.task_events
    tls = _tls_options(url)
    return {
        # rediss:// URLs: TLS with certificate checking (ssl_cert_reqs, ssl_ca_certs,
        # ssl_certfile, ssl_keyfile from the URL's query), for the broker and the backend alike.
        **({"broker_use_ssl": tls, "redis_backend_use_ssl": tls} if tls else {}),
        # Connections that retry a command a full Redis refused (workers.transport): a worker
        # keeps its message and waits for memory instead of exiting. Celery's "class+URL".
        "broker_url": url,
        "broker_transport": "workers.transport:Transport",
        "result_backend": "workers.transport:PatientRedisBackend+" + url,
        # JSON only: pickle in a message is remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": visibility,
        # Ack after the task finished, and requeue when the worker process dies under it
        # (OOM, preemption): a shard is never lost because a worker was.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message at a time per process: a long GPU shard must not hold others hostage.
        "worker_prefetch_multiplier": 1,
        "task_time_limit": time_limit,
        "task_soft_time_limit": max(time_limit - 60, int(time_limit * 0.9)),
        # Chord counters and results must outlive the longest job (default is one day).
        "result_expires": 7 * 24 * 3600,
        # Results hold the return value only, not the task's arguments (a plan per shard task):
        # Flower shows arguments from events, nothing reads them from the backend.
        "result_extended": False,
        # A redelivered task whose result is already SUCCESS is skipped.
        "worker_deduplicate_successful_tasks": True,
        # A Redis restart must not fail the running task when it stores progress or a result.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        # Keep reconnecting to a restarting Redis instead of exiting after 100 tries.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Task events (what Flower shows) cost a worker ~1 ms a task in Redis publishes, so
        # workers send them while a monitor asks: Flower asks every 5 s, `featurefleet
        # dashboard` at once (Celery's own default). FEATUREFLEET_TASK_EVENTS=1 sends them from
        # the start, for monitors that do not ask. No STARTED state in the result backend:
        # nothing reads it (the job record tracks running shards; Flower has the task-started
        # event) and each stored state costs the task a read and a write to Redis.
        "worker_send_task_events": events,
        "task_send_sent_event": events,
        "task_track_started": False,
        "task_default_queue": TRAIN_QUEUE,
        "task_routes": {"featurefleet.extract_shard": {"queue": EXTRACT_QUEUE}},
        # SIGTERM (workers start with REMAP_SIGTERM=SIGQUIT): finish the running shard within
        # this time, else stop it and hand its message straight back to the queue.
        "worker_soft_shutdown_timeout": settings.soft_shutdown_s,
        # Loading a backbone in the child may take longer than the default 4 s budget.
        "worker_proc_alive_timeout": 60,
        "worker_hijack_root_logger": False,
        "broker_connection_timeout": 5,
        "redis_socket_connect_timeout": 5,
    }


def _tls_options(url: str) -> dict[str, Any] | None:
    import ssl
    from urllib.parse import parse_qs, urlsplit

    if not url.startswith("rediss://"):
        return None
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    levels = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE}
    opts: dict[str, Any] = {"ssl_cert_reqs": levels.get(reqs, ssl.CERT_REQUIRED)}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            opts[key] = query[key]
    return opts


def __getattr__(name: str) -> Any:
    """Module attributes for ``config_from_object``: evaluated when Celery reads them."""
    config = celery_config()
    if name in config:
        return config[name]
    raise AttributeError(name)


def __dir__() -> list[str]:
    return sorted(celery_config())
