"""Redis connections that ride out a full Redis: kombu's transport and Celery's result backend,
with redis-py retrying ``OutOfMemoryError`` (``maxmemory`` reached under ``noeviction``); and
messages a worker held when Redis went away put back by its next connection.

Without this, the first write Redis refuses (an ack's MULTI/EXEC, storing a result) raises in
the worker's main process: the worker exits and its message stays unacked until the
visibility timeout, so the job hangs. With it, each refused command is retried with backoff
(:data:`OOM_PATIENCE_S` in all) while the worker keeps its message; once memory is available
the command goes through and the job finishes. Selected in ``workers.settings`` by
``broker_transport`` and by the app's result backend class.

When a connection closes, kombu puts the messages its channel holds unacked back on their
queue — through Redis, so not when Redis itself went away (a restart): they stay in the
``unacked`` index, which only the visibility timeout (hours) returns, and the watchdog sees
them as held by a worker. One fetched at the instant Redis stopped hung a job in CI (its
worker never started it). Here the tags a closing channel could not put back are kept in the
process, and its next channel (once Redis answers again) puts them back: the same
at-least-once redelivery kombu gives when Redis is up, and tasks are idempotent.
"""

from __future__ import annotations

import os
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


_LEFT_BEHIND: set[str] = set()  # delivery tags a closing channel could not put back
# (a forked pool process holds no message: it must not restore its parent's, perhaps since
# redelivered under the same tag and running elsewhere)
os.register_at_fork(after_in_child=_LEFT_BEHIND.clear)


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def restore_unacked(self, client: Any = None) -> None:
        tags = list(self._delivered)
        try:
            super().restore_unacked(client)
        except Exception:  # Redis is gone (kombu swallows this): the next channel restores
            _LEFT_BEHIND.update(tags)
            raise


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # (it pings Redis: raises while Redis is away)
        restore_left_behind(self)

    def _connparams(self, asynchronous: bool = False) -> Any:
        params = super()._connparams(asynchronous)
        # the BRPOP connection only reads (a full Redis serves it): left as kombu made it
        return params if asynchronous else _patient(params)


def restore_left_behind(channel: Channel) -> None:
    """Put back on their queues the messages earlier channels of this process held when Redis
    went away (a tag already acknowledged or restored is a no-op). A tag whose restore fails
    again waits for the next channel."""
    for tag in list(_LEFT_BEHIND):
        try:
            channel.qos.restore_by_tag(tag, leftmost=True)
        except Exception:  # Redis went away again
            break
        _LEFT_BEHIND.discard(tag)


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
