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
METRICS_KEY = "ff:metrics"  # fleet-wide counters, read by `featurefleet exporter`
SHARD_BUCKETS = (1, 5, 15, 60, 300, 1800)  # shard duration histogram (seconds)


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


def connect(url: str | None = None, check: bool = True, patient: bool = False) -> Any:
    """A Redis client for ``url``; with ``check``, fail fast when it cannot be reached.

    ``patient`` clients (workers) retry each command through a Redis restart (about a minute
    of exponential backoff) instead of failing the task that is running.

    Raises:
        BrokerError: the URL is not a Redis URL, or Redis does not answer.
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    url = broker_url(url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerError(f"broker URL {redact(url)!r} is not a Redis URL; fix: use "
                          "redis://[:password@]host:port/db (or rediss:// for TLS)")
    try:
        retry = Retry(ExponentialBackoff(cap=4.0, base=0.2), 20 if patient else 1)
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10,
                                      health_check_interval=30, decode_responses=True,
                                      retry=retry, retry_on_error=[redis.ConnectionError,
                                                                   redis.TimeoutError])
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
        self._scripts: dict[str, Any] = {}

    def _eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        """Run a Lua script by its SHA (EVALSHA; loaded again after a Redis restart)."""
        if script not in self._scripts:
            self._scripts[script] = self.r.register_script(script)
        return self._scripts[script](keys=keys_and_args[:numkeys], args=keys_and_args[numkeys:])

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
        fields.setdefault("activity", time.time())  # the watchdog's sign of life
        self.r.hset(self._key(job_id), mapping={k: _enc(v) for k, v in fields.items()})

    def field(self, job_id: str, name: str) -> Any:
        return _dec(self.r.hget(self._key(job_id), name))

    def incr(self, job_id: str, field: str, amount: int = 1) -> int:
        return int(self.r.hincrby(self._key(job_id), field, amount))

    def mark_running(self, job_id: str, stage: str) -> str:
        """First task of a job sets ``started``; a task of a job that is not final sets status
        RUNNING and the stage. Returns the status before (a final one is left alone)."""
        before = self._eval(_MARK_RUNNING, 1, self._key(job_id), _enc(time.time()),
                            _enc(stage))
        return str(_dec(before)) if before else "PENDING"

    def attempt(self, job_id: str, shard_id: str) -> int:
        """Count one more start of a shard's task; returns the count (1 on the first)."""
        key = self._key(job_id) + ":attempts"
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(key, shard_id, 1)
        pipe.expire(key, JOB_TTL_S)
        return int(pipe.execute()[0])

    def shard_progress(self, job_id: str, shard_id: str, done: int) -> None:
        """Images done in a running shard. Set, not added: a killed attempt's count is
        replaced by the next attempt's, so ``images_done`` never counts an image twice."""
        key = self._key(job_id) + ":progress"
        if self.r.hget(self._key(job_id) + ":shards", shard_id) is None:  # not finished yet
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(key, shard_id, done)
            pipe.hset(self._key(job_id), "activity", _enc(time.time()))
            pipe.execute()

    def record_shard(self, job_id: str, result: dict[str, Any], rows: int) -> bool:
        """Store a finished shard's result and settle its counters (the job's and the fleet's
        metrics), atomically, once. Returns False for a shard recorded before (a redelivered
        task)."""
        seconds = float(result.get("seconds") or 0.0)
        bucket = next((f"le_{b:g}" for b in SHARD_BUCKETS if seconds <= b), "le_inf")
        extracted = 0 if result.get("cached") else int(result.get("rows", 0))
        new = self._eval(_RECORD_SHARD, 4, self._key(job_id), self._key(job_id) + ":shards",
                         self._key(job_id) + ":progress", METRICS_KEY, result["shard"],
                         json.dumps(result), len(result.get("skipped", [])), rows, JOB_TTL_S,
                         extracted, seconds, bucket)
        return bool(new)

    def create_comparison(self, compare_id: str, fields: dict[str, Any]) -> None:
        key = f"ff:cmp:{compare_id}"
        self.r.hset(key, mapping={k: _enc(v) for k, v in
                                  {"status": "RUNNING", "created": time.time(), **fields}.items()})
        self.r.expire(key, JOB_TTL_S)

    def update_comparison(self, compare_id: str, **fields: Any) -> None:
        self.r.hset(f"ff:cmp:{compare_id}", mapping={k: _enc(v) for k, v in fields.items()})

    def comparison(self, compare_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(f"ff:cmp:{compare_id}")
        return {k: _dec(v) for k, v in raw.items()}

    def settle_comparison(self, compare_id: str, job_id: str) -> bool:
        """Count a child job's end once; True for exactly one caller: the last child."""
        return bool(self._eval(_SETTLE, 2, f"ff:cmp:{compare_id}", f"ff:cmp:{compare_id}:done",
                               job_id, JOB_TTL_S))

    def announce_worker(self, name: str, gpus: int) -> None:
        """A worker came up: remember its GPU count (read back by :meth:`fleet_gpus`)."""
        self.r.hset("ff:fleet", name, json.dumps({"gpus": gpus, "at": time.time()}))

    def fleet_gpus(self, live: list[str]) -> int:
        """GPUs of the live workers (names from a Celery ping) as they announced them."""
        raw = self.r.hmget("ff:fleet", live) if live else []
        return sum(json.loads(v)["gpus"] for v in raw if v)

    def count_failure(self, kind: str) -> None:
        """A fleet-wide failure counter (``jobs_failed``, ...) for the metrics exporter."""
        self.r.hincrby(METRICS_KEY, kind, 1)

    def shard_results(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(self._key(job_id) + ":shards")
        return {k: json.loads(v) for k, v in raw.items()}

    def finish(self, job_id: str, status: str, **fields: Any) -> bool:
        """Move a job to a final status once (atomically); False when it already was final."""
        values = {k: _enc(v) for k, v in {**fields, "finished": time.time()}.items()}
        flat = [x for kv in values.items() for x in kv]
        return bool(self._eval(_FINISH, 1, self._key(job_id), _enc(status), *flat))

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's fields, decoded.

        Raises:
            JobError: no job with that id.
        """
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self._key(job_id))
        pipe.hvals(self._key(job_id) + ":progress")
        raw, progress = pipe.execute()
        if not raw:
            raise JobError(f"no job {job_id!r} on this broker; fix: check the id (featurefleet "
                           "jobs lists recent ones) and the --broker URL")
        record = {k: _dec(v) for k, v in raw.items()}
        # Cached shards count as done from the start; the rest as their tasks report.
        record["images_done"] = int(record.get("images_cached", 0)) + sum(map(int, progress))
        return record

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        ids = self.r.zrevrange("ff:jobs", 0, limit - 1)
        out = []
        for job_id in ids:
            try:
                out.append({"id": job_id, **self.get(job_id)})
            except JobError:
                self.r.zrem("ff:jobs", job_id)
        return out


_FINAL_LUA = "({" + ", ".join(f"['{json.dumps(s)}']=true" for s in FINAL) + "})"

_MARK_RUNNING = f"""
local before = redis.call('HGET', KEYS[1], 'status')
redis.call('HSETNX', KEYS[1], 'started', ARGV[1])
if before and {_FINAL_LUA}[before] then return before end
redis.call('HSET', KEYS[1], 'status', '"RUNNING"', 'stage', ARGV[2])
return before
"""

_FINISH = f"""
local before = redis.call('HGET', KEYS[1], 'status')
if before and {_FINAL_LUA}[before] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

_RECORD_SHARD = """
local new = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if new == 1 then
  redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
  redis.call('HINCRBY', KEYS[1], 'images_skipped', ARGV[3])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  redis.call('HINCRBY', KEYS[4], 'shards_recorded', 1)
  redis.call('HINCRBY', KEYS[4], 'images_extracted', ARGV[6])
  redis.call('HINCRBY', KEYS[4], 'images_skipped', ARGV[3])
  redis.call('HINCRBYFLOAT', KEYS[4], 'shard_seconds_sum', ARGV[7])
  redis.call('HINCRBY', KEYS[4], 'shard_seconds_' .. ARGV[8], 1)
end
return new
"""


# A child job of a comparison ended: add it to the done set once; return 1 only to the call
# that completes the set (so exactly one worker writes the leaderboard).
_SETTLE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[2], ARGV[2])
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
if redis.call('SCARD', KEYS[2]) == total then return 1 end
return 0
"""


def _enc(value: Any) -> str:
    return json.dumps(value)


def _dec(value: str | None) -> Any:
    return None if value is None else json.loads(value)
