"""The one exception tree of featurefleet.

    FeaturefleetError            every error the library raises on purpose
    ├── SpecError                a job spec field is invalid (names the field and the fix)
    ├── DataError                the data cannot be read or is unusable
    ├── BackboneError            unknown backbone / weights, or weights that do not fit
    ├── StoreError               the feature store cannot be written or holds a bad shard
    ├── BrokerError              Redis / Celery cannot be reached
    └── JobError                 a job failed, was not found, or timed out

Messages are one line: what is wrong (with the bad value) and how to fix it.
"""

from __future__ import annotations


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
