"""Redis connections that ride out a full Redis: kombu's transport and Celery's result backend,
with redis-py retrying ``OutOfMemoryError`` (``maxmemory`` reached under ``noeviction``).

Without this, the first write Redis refuses (an ack's MULTI/EXEC, storing a result) raises in
the worker's main process: the worker exits and its message stays unacked until the
visibility timeout, so the job hangs. With it, each refused command is retried with backoff
(:data:`OOM_PATIENCE_S` in all) while the worker keeps its message; once memory is available
the command goes through and the job finishes. Selected in ``workers.settings`` by
``broker_transport`` and by the app's result backend class.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend
from kombu.transport import redis as kombu_redis

from pipeline.jobs.broker import OOM_PATIENCE_S, patient_retry


def _patient(params: dict[str, Any]) -> dict[str, Any]:
    """Connection parameters whose commands are retried while Redis refuses writes (only
    then: connection errors still reach kombu's and Celery's own reconnection logic)."""
    from redis.exceptions import OutOfMemoryError

    return {**params, "retry": patient_retry(only_full=True),
            "retry_on_error": [OutOfMemoryError]}


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    def _connparams(self, asynchronous: bool = False) -> Any:
        params = super()._connparams(asynchronous)
        # the BRPOP connection only reads (a full Redis serves it): left as kombu made it
        return params if asynchronous else _patient(params)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport whose connections retry refused writes (redis:// and
    rediss:// URLs alike)."""

    Channel = Channel


class PatientRedisBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend whose connections retry refused writes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connparams: dict[str, Any] = _patient(self.connparams)


__all__ = ["OOM_PATIENCE_S", "PatientRedisBackend", "Transport"]
