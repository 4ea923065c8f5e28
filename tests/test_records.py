"""Job records and their Lua scripts, against one shared real redis-server (fast layer)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from pipeline.errors import JobError, JobLost
from pipeline.jobs.records import JOB_TTL_S, METRICS_KEY, JobStore
from pipeline.store.shards import ShardResult

JOB = "00000000abcd"


def test_create_update_and_read(jobs: JobStore) -> None:
    jobs.create(JOB, {"name": "n", "shards_total": 3})
    jobs.update(JOB, stage="train", nested={"a": [1, 2]})
    st = jobs.get(JOB)
    assert st["status"] == "PENDING" and st["stage"] == "train" and st["nested"] == {"a": [1, 2]}
    assert st["images_done"] == 0 and 0 < jobs.r.ttl(f"ff:job:{JOB}") <= JOB_TTL_S
    assert [j["id"] for j in jobs.recent()] == [JOB]


def test_a_record_is_never_created_twice(jobs: JobStore) -> None:
    """Recovery of a job that still has its record (or a copy of a finished job's plan) must
    not wipe the record's history: create refuses, the record stays as it was."""
    jobs.create(JOB, {"name": "n"})
    jobs.finish(JOB, "SUCCESS", report="/r.json")
    with pytest.raises(JobError, match=rf"job {JOB} already has a record \(status SUCCESS\)"):
        jobs.create(JOB, {"name": "other"})
    st = jobs.get(JOB)
    assert st["status"] == "SUCCESS" and st["name"] == "n" and st["report"] == "/r.json"


def test_writes_never_recreate_a_lost_record(jobs: JobStore) -> None:
    """Redis restarted without its data: a worker's write raises JobLost and leaves no hash
    without status or expiry behind."""
    for write in (lambda: jobs.update(JOB, stage="x"), lambda: jobs.incr(JOB, "n"),
                  lambda: jobs.mark_running(JOB, "extract"),
                  lambda: jobs.start(JOB, "extract", "0-4"),
                  lambda: jobs.shard_progress(JOB, "0-4", 2),
                  lambda: jobs.record_shard(JOB, ShardResult(shard="0-4", path="p", rows=4),
                                            4)):
        with pytest.raises(JobLost, match=rf"job {JOB}'s record is gone.*fix: featurefleet retry"):
            write()
    assert not jobs.finish(JOB, "FAILED")
    assert jobs.r.keys(f"ff:job:{JOB}*") == []
    with pytest.raises(JobError, match=rf"no job '{JOB}'.*--job-dir"):
        jobs.get(JOB)


def test_mark_running_and_finish_once(jobs: JobStore) -> None:
    jobs.create(JOB, {})
    assert jobs.mark_running(JOB, "extract") == "PENDING"
    started = jobs.field(JOB, "started")
    assert jobs.mark_running(JOB, "train") == "RUNNING"
    assert jobs.field(JOB, "started") == started and jobs.field(JOB, "stage") == "train"
    assert jobs.finish(JOB, "CANCELLED", error="by user")
    assert not jobs.finish(JOB, "SUCCESS")  # final stays final
    assert jobs.mark_running(JOB, "evaluate") == "CANCELLED"
    st = jobs.get(JOB)
    assert st["status"] == "CANCELLED" and st["error"] == "by user" and st["stage"] == "train"


def test_start_marks_running_and_counts_the_attempt_in_one_call(jobs: JobStore) -> None:
    jobs.create(JOB, {})
    assert jobs.start(JOB, "extract", "0-4") == ("PENDING", 1)
    assert jobs.start(JOB, "extract", "0-4") == ("RUNNING", 2)
    assert jobs.start(JOB, "extract", "4-8") == ("RUNNING", 1)
    assert jobs.attempt(JOB, "0-4") == 3  # the same counter as attempt()
    assert jobs.field(JOB, "stage") == "extract" and jobs.field(JOB, "started")
    assert 0 < jobs.r.ttl(f"ff:job:{JOB}:attempts") <= JOB_TTL_S
    jobs.finish(JOB, "CANCELLED")
    assert jobs.start(JOB, "extract", "0-4") == ("CANCELLED", 4)  # final stays final
    assert jobs.get(JOB)["status"] == "CANCELLED"


def test_a_shard_is_counted_once_and_progress_is_set_not_added(jobs: JobStore) -> None:
    jobs.create(JOB, {"images_cached": 10})
    assert jobs.shard_progress(JOB, "0-4", 2) == "PENDING"
    assert jobs.shard_progress(JOB, "0-4", 3) == "PENDING"  # a second attempt's count
    assert jobs.get(JOB)["images_done"] == 13
    result = ShardResult(shard="0-4", path="p", rows=3,
                         skipped=[{"id": "x", "reason": "bad"}], seconds=2.0)
    assert jobs.record_shard(JOB, result, 4)
    assert not jobs.record_shard(JOB, result.model_copy(update={"rows": 99}), 4)  # redelivered
    jobs.shard_progress(JOB, "0-4", 1)  # a late progress report of a finished shard
    st = jobs.get(JOB)
    assert st["shards_done"] == 1 and st["images_skipped"] == 1 and st["images_done"] == 14
    assert jobs.shard_results(JOB)["0-4"]["rows"] == 3
    m = jobs.r.hgetall(METRICS_KEY)
    assert m["shards_recorded"] == "1" and m["images_extracted"] == "3"
    assert m["shard_seconds_le_5"] == "1" and float(m["shard_seconds_sum"]) == 2.0


def test_sweep_slices_are_kept_once(jobs: JobStore) -> None:
    jobs.create(JOB, {})
    jobs.record_slice(JOB, 1, {"slice": 1, "curve": [1]})
    jobs.record_slice(JOB, 1, {"slice": 1, "curve": [2]})  # the slice ran twice
    jobs.record_slice(JOB, 0, {"slice": 0, "curve": [0]})
    assert sorted((s["slice"], s["curve"]) for s in jobs.slices(JOB)) == [(0, [0]), (1, [1])]


def test_task_ids_accumulate_over_rounds(jobs: JobStore) -> None:
    jobs.create(JOB, {"task_ids": ["a.x"]})
    jobs.add_task_ids(JOB, ["a.x.r1", "a.y.r1"])
    assert jobs.field(JOB, "task_ids") == ["a.x", "a.x.r1", "a.y.r1"]


def test_exactly_one_child_writes_the_leaderboard(jobs: JobStore) -> None:
    jobs.create_comparison("cmp-0000000001", {"total": 3, "jobs": []})
    results = [jobs.settle_comparison("cmp-0000000001", j) for j in ("a", "b", "a", "c")]
    assert results == [False, False, False, True]  # "a" twice counts once; "c" completes it
    assert not jobs.settle_comparison("cmp-0000000001", "d")


def test_fleet_gpus_of_live_workers(jobs: JobStore) -> None:
    jobs.announce_worker("gpu0@h", 1)
    jobs.announce_worker("gpu1@h", 1)
    jobs.announce_worker("cpu@h", 0)
    assert jobs.fleet_gpus(["gpu0@h", "cpu@h", "gone@h"]) == 1
    assert jobs.fleet_gpus([]) == 0
    raw: Any = jobs.r.hget("ff:fleet", "gpu1@h")
    assert json.loads(raw)["gpus"] == 1


def test_quality_parts_are_counted_once_for_the_progress_line(jobs: JobStore) -> None:
    from pipeline.client.console import format_progress

    jobs.create(JOB, {"quality_parts_total": 4, "images_total": 90, "images_done": 90})
    jobs.update(JOB, stage="quality")
    for part in ("fold.0", "fold.1", "fold.0"):  # a part delivered twice counts once
        jobs.record_part(JOB, "quality", part, {"part": part})
    st = jobs.get(JOB)
    assert st["quality_parts_done"] == 2
    line = format_progress({**st, "status": "RUNNING"})
    assert "quality  parts 2/4" in line and "[" + "#" * 12 + "-" * 12 + "]" in line
    text = format_progress({**st, "status": "RUNNING", "stage": "extract", "modality": "text",
                            "images_done": 30, "started": st["created"] - 10})
    assert "texts 30/90" in text and "txt/s" in text and "images" not in text


def test_the_eta_follows_recent_throughput_and_a_stall_is_named() -> None:
    """The first minute ran at 10 img/s, the last 30 s at 1 img/s: the ETA uses the recent
    rate; a count that stops moving shows "no progress for Ns" instead of a growing ETA."""
    from pipeline.client.console import Throughput, format_progress

    tp = Throughput(window_s=30)
    st = {"status": "RUNNING", "stage": "extract", "images_total": 1000, "shards_total": 4,
          "started": time.time() - 90}
    for t in range(0, 61, 5):
        tp.add(10 * t, now=float(t))
    for t in range(65, 91, 5):
        tp.add(600 + (t - 60), now=float(t))
    recent = tp.recent()
    assert recent is not None and abs(recent[0] - 1.0) < 0.01 and recent[1] >= 25
    line = format_progress({**st, "images_done": 630}, tp)
    assert "1.0 img/s" in line and "ETA 6m10s" in line  # 370 left at 1/s, not at 7/s
    for t in range(95, 121, 5):
        tp.add(630, now=float(t))
    assert tp.stalled_s() == 30
    line = format_progress({**st, "images_done": 630}, tp)
    assert "no progress for 30s" in line and "ETA" not in line
    tp.add(5, now=200.0)  # a new stage counts from zero: the window starts again
    assert tp.recent() is None and tp.stalled_s() == 0
    # without polls (featurefleet status): the average since the start
    assert "ETA" in format_progress({**st, "images_done": 630})


def test_a_node_lease_has_one_live_holder(jobs: JobStore) -> None:
    """The running execution renews its lease (taking it again if it lapsed while nobody
    took it, e.g. a long wait for peers); a second delivery sees it busy, then gets its
    outcome, or takes over once the holder stopped renewing."""
    from pipeline.jobs.nodes import Lease

    first, second = Lease(jobs, JOB, "pretrain.0.0.1"), Lease(jobs, JOB, "pretrain.0.0.1")
    assert first.acquire() and not second.acquire()
    jobs.r.delete(first.key)  # lapsed (the holder waited longer than the TTL)
    assert first.renew() and not second.acquire()  # nobody took it: the holder goes on
    assert second.check() == ("busy", None)
    first.release({"state": "done", "slot": 1})
    assert second.check() == ("done", {"state": "done", "slot": 1})
    third, fourth = Lease(jobs, JOB, "pretrain.1.0.1"), Lease(jobs, JOB, "pretrain.1.0.1")
    assert third.acquire()
    jobs.r.delete(third.key)  # the holder died: its lease expired
    assert fourth.check() == ("mine", None)  # taken over
    assert not third.renew()  # the old holder learns it lost the node
    # a delivery that arrives after the node finished (its message came back while the slice
    # ran long) takes the outcome, never the free lease: running again would regroup the run
    fourth.release({"state": "continue", "slot": 1})
    late = Lease(jobs, JOB, "pretrain.1.0.1")
    assert late.check() == ("done", {"state": "continue", "slot": 1})
    assert late.acquire()  # the lease itself was free: check() did not take it
