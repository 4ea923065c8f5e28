"""Job state in Redis: status, progress counters, timings and each finished shard's record.

Keys (all small): ``ff:job:<id>`` (hash of fields), ``ff:job:<id>:shards`` (shard id -> JSON
result), ``ff:jobs`` (sorted set of job ids by creation time). Readable while a job runs, by
``featurefleet status`` and :meth:`pipeline.Job.status`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from pipeline.errors import BrokerError, JobError

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
BROKER_ENV = "FEATUREFLEET_BROKER_URL"
STATUSES = ("PENDING", "RUNNING", "SUCCESS", "FAILED", "CANCELLED")
FINAL = ("SUCCESS", "FAILED", "CANCELLED")
JOB_TTL_S = 30 * 24 * 3600  # job records outlive any job; listing shows a month of history


def broker_url(url: str | None = None) -> str:
    """The broker URL: the argument, else $FEATUREFLEET_BROKER_URL, else local Redis."""
    return url or os.environ.get(BROKER_ENV) or DEFAULT_BROKER


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str | None = None, check: bool = True) -> Any:
    """A Redis client for ``url``; with ``check``, fail fast when it cannot be reached.

    Raises:
        BrokerError: the URL is not a Redis URL, or Redis does not answer.
    """
    import redis

    url = broker_url(url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerError(f"broker URL {redact(url)!r} is not a Redis URL; fix: use "
                          "redis://[:password@]host:port/db (or rediss:// for TLS)")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10,
                                      health_check_interval=30, decode_responses=True)
        if check:
            client.ping()
    except redis.AuthenticationError:
        raise BrokerError(f"Redis at {redact(url)!r} refused the password; fix: put the right "
                          "password in the URL (redis://:PASSWORD@host:port/0)") from None
    except (redis.ConnectionError, redis.TimeoutError, ValueError, OSError) as exc:
        raise BrokerError(f"cannot reach Redis at {redact(url)!r} ({exc}); fix: start "
                          f"redis-server there, or pass --broker / set {BROKER_ENV} to a "
                          "reachable Redis (featurefleet demo starts its own)") from None
    return client


class JobStore:
    """Read and write job records in Redis."""

    def __init__(self, client: Any) -> None:
        self.r = client

    @staticmethod
    def _key(job_id: str) -> str:
        return f"ff:job:{job_id}"

    def create(self, job_id: str, fields: dict[str, Any]) -> None:
        now = time.time()
        key = self._key(job_id)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={k: _enc(v) for k, v in
                                {"status": "PENDING", "created": now, **fields}.items()})
        pipe.expire(key, JOB_TTL_S)
        pipe.zadd("ff:jobs", {job_id: now})
        pipe.execute()

    def update(self, job_id: str, **fields: Any) -> None:
        self.r.hset(self._key(job_id), mapping={k: _enc(v) for k, v in fields.items()})

    def field(self, job_id: str, name: str) -> Any:
        return _dec(self.r.hget(self._key(job_id), name))

    def incr(self, job_id: str, field: str, amount: int = 1) -> int:
        return int(self.r.hincrby(self._key(job_id), field, amount))

    def mark_running(self, job_id: str, stage: str) -> None:
        """First task of a job sets ``started``; every task sets status and stage (1 trip)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hsetnx(self._key(job_id), "started", _enc(time.time()))
        pipe.hset(self._key(job_id), mapping={"status": _enc("RUNNING"), "stage": _enc(stage)})
        pipe.execute()

    def record_shard(self, job_id: str, result: dict[str, Any], rows: int,
                     reported: int) -> bool:
        """Store a finished shard's result and settle its counters, atomically, once.

        ``reported`` images were already counted by this attempt's progress updates. A shard
        recorded before (a redelivered task) undoes them, so ``images_done`` stays exact.
        Returns False for such a duplicate.
        """
        new = self.r.eval(_RECORD_SHARD, 2, self._key(job_id), self._key(job_id) + ":shards",
                          result["shard"], json.dumps(result), len(result.get("skipped", [])),
                          rows - reported, -reported, JOB_TTL_S)
        return bool(new)

    def shard_results(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(self._key(job_id) + ":shards")
        return {k: json.loads(v) for k, v in raw.items()}

    def finish(self, job_id: str, status: str, **fields: Any) -> bool:
        """Move a job to a final status once; False when it was already final."""
        key = self._key(job_id)
        current = _dec(self.r.hget(key, "status"))
        if current in FINAL:
            return False
        self.update(job_id, status=status, finished=time.time(), **fields)
        return True

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's fields, decoded.

        Raises:
            JobError: no job with that id.
        """
        raw = self.r.hgetall(self._key(job_id))
        if not raw:
            raise JobError(f"no job {job_id!r} on this broker; fix: check the id (featurefleet "
                           "jobs lists recent ones) and the --broker URL")
        return {k: _dec(v) for k, v in raw.items()}

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        ids = self.r.zrevrange("ff:jobs", 0, limit - 1)
        out = []
        for job_id in ids:
            try:
                out.append({"id": job_id, **self.get(job_id)})
            except JobError:
                self.r.zrem("ff:jobs", job_id)
        return out


_RECORD_SHARD = """
local new = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if new == 1 then
  redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
  redis.call('HINCRBY', KEYS[1], 'images_skipped', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'images_done', ARGV[4])
else
  redis.call('HINCRBY', KEYS[1], 'images_done', ARGV[5])
end
return new
"""


def _enc(value: Any) -> str:
    return json.dumps(value)


def _dec(value: str | None) -> Any:
    return None if value is None else json.loads(value)
