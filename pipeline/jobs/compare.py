"""The worker side of a comparison: each child job, when it ends, settles once in the
comparison's record; the one that settles last writes the leaderboard."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.jobs.records import JobStore
from pipeline.reports import leaderboard

log = logging.getLogger(__name__)
SUBMITTED = "__submitted__"  # the client's mark: every child job was enqueued


def settle(jobs: JobStore, job_id: str) -> str | None:
    """A child job ended: count it once; the last one writes the leaderboard (its path)."""
    compare_id = jobs.field(job_id, "compare_id")
    if not compare_id or not jobs.settle_comparison(compare_id, job_id):
        return None
    return write_for(jobs, compare_id)


def write_for(jobs: JobStore, compare_id: str) -> str | None:
    """Write the comparison's leaderboard from its children's records and reports."""
    rec = jobs.comparison(compare_id)
    try:
        board = leaderboard.leaderboard(compare_id, [{"id": j, **jobs.get(j)}
                                                     for j in rec["jobs"]])
        path = leaderboard.write(board, Path(rec["dir"]))
    except Exception as exc:  # the children's results stand; say why there is no board
        log.exception("comparison %s: no leaderboard", compare_id)
        jobs.update_comparison(compare_id, status="FAILED", finished=time.time(),
                               error=f"leaderboard not written: {type(exc).__name__}: {exc}")
        return None
    jobs.update_comparison(compare_id, leaderboard=str(path), status="SUCCESS",
                           finished=time.time())
    return str(path)
