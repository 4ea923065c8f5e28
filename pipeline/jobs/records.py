"""Job records in Redis: status, progress counters, timings and each finished step's result.

Keys (all small): ``ff:job:<id>`` (hash of fields), ``ff:job:<id>:shards`` (shard id -> JSON
result), ``:progress`` (shard id -> samples done), ``:attempts`` (step -> starts), ``:sweep``
(slice -> result), ``:quality`` (part -> result), ``ff:jobs`` (sorted set of job ids by
creation time), ``ff:metrics`` (fleet counters), ``ff:fleet`` (GPUs per worker),
``ff:cmp:<id>`` (comparisons).

Only :meth:`JobStore.create` creates a job record. Every other write is a Lua script that
changes a record only if it exists, so a worker never re-creates a job whose record was lost
(Redis restarted without its data) as a hash with no status and no expiry: it raises
:class:`~pipeline.errors.JobLost` instead, and the job is recovered from its plan.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline.errors import JobError, JobLost
from pipeline.store.shards import ShardResult

STATUSES = ("PENDING", "RUNNING", "SUCCESS", "FAILED", "CANCELLED")
FINAL = ("SUCCESS", "FAILED", "CANCELLED")
JOB_TTL_S = 30 * 24 * 3600  # job records outlive any job; listing shows a month of history
METRICS_KEY = "ff:metrics"  # fleet-wide counters, read by `featurefleet exporter`
SHARD_BUCKETS = (1, 5, 15, 60, 300, 1800)  # shard duration histogram (seconds)


def job_key(job_id: str) -> str:
    return f"ff:job:{job_id}"


class JobStore:
    """Read and write job records in Redis."""

    def __init__(self, client: Any) -> None:
        self.r = client
        self._scripts: dict[str, Any] = {}

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by its SHA (EVALSHA; loaded again after a Redis restart)."""
        if script not in self._scripts:
            self._scripts[script] = self.r.register_script(script)
        return self._scripts[script](keys=keys, args=args)

    def _lost(self, job_id: str) -> JobLost:
        return JobLost(f"job {job_id}'s record is gone from Redis (restarted without its data?);"
                       f" fix: featurefleet retry {job_id} --job-dir <output>/jobs/{job_id} "
                       "(finished shards are reused), or run featurefleet watchdog --recover")

    # --- one job ---------------------------------------------------------------------------

    def create(self, job_id: str, fields: dict[str, Any]) -> None:
        """Create a job's record; an existing record is never replaced (its history would be
        lost: a recovery of a job that still has one, or a finished one, is refused here too).

        Raises:
            JobError: the job already has a record.
        """
        now = time.time()
        flat = [x for kv in ((k, _enc(v)) for k, v in
                             {"status": "PENDING", "created": now, "activity": now,
                              **fields}.items()) for x in kv]
        if not self._eval(_CREATE, [job_key(job_id), "ff:jobs"],
                          [JOB_TTL_S, job_id, now, *flat]):
            raise JobError(f"job {job_id} already has a record (status "
                           f"{self.field(job_id, 'status')}); nothing was changed; fix: "
                           f"featurefleet status {job_id}")

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(job_key(job_id)))

    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields of an existing record (and its sign of life for the watchdog).

        Raises:
            JobLost: the record does not exist.
        """
        fields.setdefault("activity", time.time())
        flat = [x for kv in ((k, _enc(v)) for k, v in fields.items()) for x in kv]
        if not self._eval(_UPDATE, [job_key(job_id)], flat):
            raise self._lost(job_id)

    def field(self, job_id: str, name: str) -> Any:
        return _dec(self.r.hget(job_key(job_id), name))

    def incr(self, job_id: str, field: str, amount: int = 1) -> int:
        got = self._eval(_INCR, [job_key(job_id)], [field, amount])
        if got is None:
            raise self._lost(job_id)
        return int(got)

    def mark_running(self, job_id: str, stage: str) -> str:
        """First task of a job sets ``started``; a task of a job that is not final sets status
        RUNNING and the stage. Returns the status before (a final one is left alone).

        Raises:
            JobLost: the record does not exist.
        """
        before = self._eval(_MARK_RUNNING, [job_key(job_id)], [_enc(time.time()), _enc(stage)])
        if before == "":
            raise self._lost(job_id)
        return str(_dec(before))

    def start(self, job_id: str, stage: str, step: str) -> tuple[str, int]:
        """:meth:`mark_running` and :meth:`attempt` in one round trip (a shard task's start:
        the coordinator's per-task cost). Returns (status before, attempts of ``step``).

        Raises:
            JobLost: the record does not exist.
        """
        before, attempts = self._eval(_START, [job_key(job_id), job_key(job_id) + ":attempts"],
                                      [_enc(time.time()), _enc(stage), step, JOB_TTL_S])
        if before == "":
            raise self._lost(job_id)
        return str(_dec(before)), int(attempts)

    def attempt(self, job_id: str, step: str) -> int:
        """Count one more start of a step's task; returns the count (1 on the first)."""
        key = job_key(job_id) + ":attempts"
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(key, step, 1)
        pipe.expire(key, JOB_TTL_S)
        return int(pipe.execute()[0])

    def shard_progress(self, job_id: str, shard_id: str, done: int) -> str | None:
        """Samples done in a running shard (set, not added: a killed attempt's count is
        replaced by the next attempt's). Returns the job's status."""
        status = self._eval(_PROGRESS, [job_key(job_id), job_key(job_id) + ":progress",
                                        job_key(job_id) + ":shards"],
                            [shard_id, done, _enc(time.time()), JOB_TTL_S])
        if status == "":
            raise self._lost(job_id)
        return str(_dec(status))

    def record_shard(self, job_id: str, result: ShardResult, rows: int) -> bool:
        """Store a finished shard's result and settle its counters (the job's and the fleet's
        metrics), atomically, once. Returns False for a shard recorded before (a redelivered
        task).

        Raises:
            JobLost: the record does not exist.
        """
        seconds = float(result.seconds or 0.0)
        bucket = next((f"le_{b:g}" for b in SHARD_BUCKETS if seconds <= b), "le_inf")
        extracted = 0 if result.cached else result.rows
        new = self._eval(_RECORD_SHARD, [job_key(job_id), job_key(job_id) + ":shards",
                                         job_key(job_id) + ":progress", METRICS_KEY],
                         [result.shard, result.model_dump_json(),
                          len(result.skipped), rows, JOB_TTL_S, extracted, seconds, bucket])
        if new == -1:
            raise self._lost(job_id)
        return bool(new)

    def shard_results(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(job_key(job_id) + ":shards")
        return {k: json.loads(v) for k, v in raw.items()}

    def record_part(self, job_id: str, group: str, name: str, result: dict[str, Any]) -> None:
        """One part of a fanned-out step (a sweep slice, a quality block...), kept once: a
        part run twice does not count twice."""
        self._eval(_RECORD_PART, [f"{job_key(job_id)}:{group}", job_key(job_id)],
                   [name, json.dumps(result), f"{group}_parts_done", JOB_TTL_S])

    def parts(self, job_id: str, group: str) -> dict[str, dict[str, Any]]:
        return {k if isinstance(k, str) else k.decode(): json.loads(v)
                for k, v in self.r.hgetall(f"{job_key(job_id)}:{group}").items()}

    def record_slice(self, job_id: str, index: int, result: dict[str, Any]) -> None:
        """A sweep slice's curve, kept once (a slice run twice does not count twice)."""
        self.record_part(job_id, "sweep", str(index), result)

    def slices(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.parts(job_id, "sweep").values())

    def finish(self, job_id: str, status: str, **fields: Any) -> bool:
        """Move a job to a final status once (atomically); False when it already was final
        or its record is gone."""
        values = {k: _enc(v) for k, v in {**fields, "finished": time.time()}.items()}
        flat = [x for kv in values.items() for x in kv]
        return bool(self._eval(_FINISH, [job_key(job_id)], [_enc(status), *flat]))

    def add_task_ids(self, job_id: str, ids: list[str]) -> None:
        """Remember more task ids of the job (a re-dispatched canvas) for cancel to revoke."""
        current = self.field(job_id, "task_ids") or []
        self.update(job_id, task_ids=sorted({*current, *ids}))

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's fields, decoded.

        Raises:
            JobError: no job with that id.
        """
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(job_key(job_id))
        pipe.hvals(job_key(job_id) + ":progress")
        raw, progress = pipe.execute()
        if not raw or "status" not in raw:
            raise JobError(f"no job {job_id!r} on this broker; fix: check the id (featurefleet "
                           "jobs lists recent ones) and the --broker URL; a job whose record "
                           "was lost is recovered with featurefleet retry "
                           f"{job_id} --job-dir <output>/jobs/{job_id}")
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

    # --- the fleet -------------------------------------------------------------------------

    def announce_worker(self, name: str, gpus: int, queues: list[str] | None = None) -> None:
        """A worker came up: remember its GPUs and queues (read by :meth:`fleet_gpus`)."""
        self.r.hset("ff:fleet", name, json.dumps({"gpus": gpus, "queues": queues or [],
                                                  "at": time.time()}))

    def fleet(self, live: list[str]) -> dict[str, dict[str, Any]]:
        raw = self.r.hmget("ff:fleet", live) if live else []
        return {n: json.loads(v) for n, v in zip(live, raw, strict=True) if v}

    def fleet_gpus(self, live: list[str]) -> int:
        """GPUs of the live workers (names from a Celery ping) as they announced them."""
        return sum(int(v.get("gpus", 0)) for v in self.fleet(live).values())

    def count_failure(self, kind: str) -> None:
        """A fleet-wide failure counter (``jobs_failed``, ...) for the metrics exporter."""
        self.r.hincrby(METRICS_KEY, kind, 1)

    # --- comparisons -----------------------------------------------------------------------

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
        return bool(self._eval(_SETTLE, [f"ff:cmp:{compare_id}", f"ff:cmp:{compare_id}:done"],
                               [job_id, JOB_TTL_S]))


_FINAL_LUA = "({" + ", ".join(f"['{json.dumps(s)}']=true" for s in FINAL) + "})"

_CREATE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV, 4))
redis.call('expire', KEYS[1], tonumber(ARGV[1]))
redis.call('zadd', KEYS[2], tonumber(ARGV[3]), ARGV[2])
return 1
"""
_RECORD_PART = """
if redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2]) == 1 and redis.call('exists', KEYS[2]) == 1
then
  redis.call('hincrby', KEYS[2], ARGV[3], 1)
end
redis.call('expire', KEYS[1], tonumber(ARGV[4]))
return 1
"""
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

_INCR = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""

_MARK_RUNNING = f"""
local before = redis.call('HGET', KEYS[1], 'status')
if not before then return '' end
redis.call('HSETNX', KEYS[1], 'started', ARGV[1])
redis.call('HSET', KEYS[1], 'activity', ARGV[1])
if {_FINAL_LUA}[before] then return before end
redis.call('HSET', KEYS[1], 'status', '"RUNNING"', 'stage', ARGV[2])
return before
"""

_START = f"""
local before = redis.call('HGET', KEYS[1], 'status')
if not before then return {{'', 0}} end
redis.call('HSETNX', KEYS[1], 'started', ARGV[1])
redis.call('HSET', KEYS[1], 'activity', ARGV[1])
local attempts = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('EXPIRE', KEYS[2], ARGV[4])
if not {_FINAL_LUA}[before] then
  redis.call('HSET', KEYS[1], 'status', '"RUNNING"', 'stage', ARGV[2])
end
return {{before, attempts}}
"""

_PROGRESS = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('HSET', KEYS[1], 'activity', ARGV[3])
end
return status
"""

_FINISH = f"""
local before = redis.call('HGET', KEYS[1], 'status')
if not before or {_FINAL_LUA}[before] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

_RECORD_SHARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
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
