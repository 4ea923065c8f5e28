"""Redis connections: the broker URL, redaction for messages and logs, patient clients."""

from __future__ import annotations

from typing import Any

from pipeline.errors import BrokerError
from pipeline.settings import BROKER_ENV, get_settings

# A full Redis (maxmemory under noeviction) refuses writes until memory is freed: workers wait
# with backoff (capped at 5 s) this long in all, keeping their message, before giving up.
OOM_PATIENCE_S = 600.0


def patient_retry(only_full: bool = False) -> Any:
    """redis-py's retry policy of worker connections: backoff from 0.2 s, capped at 5 s, for
    about :data:`OOM_PATIENCE_S`. ``only_full``: retry only the writes a full Redis refused
    (kombu and Celery reconnect by themselves after a connection error: a retry inside
    redis-py would leave their event loop on a dead socket)."""
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import OutOfMemoryError
    from redis.retry import Retry

    retries = int(OOM_PATIENCE_S / 5.0)
    if only_full:
        return Retry(ExponentialBackoff(cap=5.0, base=0.2), retries,
                     supported_errors=(OutOfMemoryError,))
    return Retry(ExponentialBackoff(cap=5.0, base=0.2), retries)


def broker_url(url: str | None = None) -> str:
    """The broker URL: the argument, else $FEATUREFLEET_BROKER_URL, else local Redis."""
    return url or get_settings().broker_url


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # a URL too broken to parse: show none of it
        return "<unparsable URL>"


def connect(url: str | None = None, check: bool = True, patient: bool = False) -> Any:
    """A Redis client for ``url``; with ``check``, fail fast when it cannot be reached.

    ``patient`` clients (workers) retry each command through a Redis restart or a full Redis
    (:func:`patient_retry`) instead of failing the task that is running.

    Raises:
        BrokerError: the URL is not a Redis URL, or Redis does not answer.
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import OutOfMemoryError
    from redis.retry import Retry

    url = broker_url(url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerError(f"broker URL {redact(url)!r} is not a Redis URL; fix: use "
                          "redis://[:password@]host:port/db (or rediss:// for TLS)")
    try:
        retry = patient_retry() if patient else Retry(ExponentialBackoff(cap=4.0, base=0.2), 1)
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10,
                                      health_check_interval=30, decode_responses=True,
                                      retry=retry, retry_on_error=[
                                          redis.ConnectionError, redis.TimeoutError,
                                          *([OutOfMemoryError] if patient else [])])
        if check:
            client.ping()
    except redis.AuthenticationError:
        raise BrokerError(f"Redis at {redact(url)!r} refused the password; fix: put the right "
                          "password in the URL (redis://:PASSWORD@host:port/0)") from None
    except (redis.ConnectionError, redis.TimeoutError, ValueError, OSError) as exc:
        raise BrokerError(f"cannot reach Redis at {redact(url)!r} ({exc}); fix: start "
                          f"redis-server there, or pass --broker / set {BROKER_ENV} to a "
                          "reachable Redis; or run the job on this machine alone: featurefleet "
                          "run job.yaml (it starts its own Redis and workers)") from None
    return client
