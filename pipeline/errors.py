"""The one exception tree of featurefleet.

    FeaturefleetError            every error the library raises on purpose
    ├── SpecError                a job spec field is invalid (names the field and the fix)
    ├── DataError                the data cannot be read or is unusable
    ├── BackboneError            unknown backbone / weights, or weights that do not fit
    ├── StoreError               the feature store cannot be written or holds a bad shard
    ├── BrokerError              Redis / Celery cannot be reached
    ├── JobError                 a job failed, was not found, or timed out
    │   ├── JobCancelled         the job was cancelled: stop without writing anything
    │   └── JobLost              the job's record is gone from Redis (restarted without data)
    └── RetryableError           a passing condition: the task is retried by the one policy
        └── NotReady             a chord body ran before all of its header's results landed

Messages are one line: what is wrong (with the bad value) and how to fix it. Values quoted in
a message are cut to a short prefix (:func:`short`), so a huge input never floods a terminal.
"""

from __future__ import annotations

from typing import Any

MAX_QUOTE = 80


def short(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the total length when cut)."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class FeaturefleetError(Exception):
    """Base class: a problem the user can fix; its message says how."""


class SpecError(FeaturefleetError, ValueError):
    """An invalid job spec field."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        super().__init__(f"spec field '{field}': {problem}; fix: {fix}")


class DataError(FeaturefleetError):
    """Data that cannot be read or used."""


class BackboneError(FeaturefleetError):
    """Unknown backbone or weights, or weights of the wrong architecture."""


class StoreError(FeaturefleetError):
    """The feature store cannot be written, or holds an invalid shard."""


class BrokerError(FeaturefleetError):
    """The broker (Redis) cannot be reached or refused the connection."""


class JobError(FeaturefleetError):
    """A job failed, was not found, or did not finish in time."""


class JobCancelled(JobError):
    """The job was cancelled (or ended otherwise): stop without writing anything."""


class JobLost(JobError):
    """The job's record is missing from Redis although its plan exists on shared storage."""


class RetryableError(FeaturefleetError):
    """A passing condition (a restarting Redis, a chord body that ran early): retry the task."""


class NotReady(RetryableError):
    """Some results a step needs are not recorded yet."""


class NodeBusy(RetryableError):
    """Another delivery of this node task is running (retried for as long as it runs)."""
