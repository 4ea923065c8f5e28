"""Every ``FEATUREFLEET_*`` environment variable, in one typed settings object.

Read with :func:`get_settings` where the value is used (never at import time), so a process
started with another environment, or a test that changes it, sees its own values.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """featurefleet's process settings (``FEATUREFLEET_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="FEATUREFLEET_", extra="ignore", frozen=True)

    broker_url: str = Field(DEFAULT_BROKER, description="Redis URL of the broker and backend")
    task_time_limit: int = Field(3600, gt=0, description="hard limit of one task, seconds")
    visibility_timeout: int | None = Field(
        None, gt=0, description="seconds before an unacked message is delivered again; "
        "default 2 x task_time_limit (it must outlast any task, or a running task is "
        "delivered twice)")
    soft_shutdown_s: float = Field(60.0, ge=0, description="SIGTERM: seconds a worker may "
                                   "finish its running task before handing it back")
    finetune_slice_s: float | None = Field(None, gt=0, description="a fine-tuning task hands "
                                           "over to a fresh task after this long; default "
                                           "half the task time limit")
    max_attempts: int = Field(3, gt=0, description="starts of one task (a worker dying under "
                              "it each time) before its job fails: a poison shard")
    allowed_roots: str = Field("", description="os.pathsep-separated folders (or URL prefixes) "
                               "that jobs may write under; empty: anywhere")
    job_deadline_s: float = Field(24 * 3600.0, gt=0, description="the watchdog fails unfinished"
                                  " jobs this long after submission")
    task_events: bool = Field(False, description="send Celery task events from the start "
                              "(monitors that do not ask for them)")
    flower_auth: str | None = Field(None, description="user:password of the dashboard")
    max_message_bytes: int = Field(1 << 20, gt=0, description="largest Celery message sent")
    store_retries: int = Field(5, ge=0, description="retries of one object-store operation")
    node_address: str | None = Field(None, description="the address the other nodes of a "
                                     "training run reach this worker at (default: the "
                                     "address of the interface that reaches the broker)")
    dist_timeout_s: float = Field(600.0, gt=0, description="a training rank waits this long "
                                  "for its peers (connecting, collectives) before it fails and "
                                  "torchrun restarts the ranks from the last checkpoint")

    @property
    def visibility(self) -> int:
        return self.visibility_timeout or 2 * self.task_time_limit

    @property
    def finetune_slice(self) -> float:
        return self.finetune_slice_s or self.task_time_limit / 2

    @property
    def roots(self) -> list[str]:
        return [r for r in self.allowed_roots.split(os.pathsep) if r.strip()]

    def local_roots(self) -> list[Path]:
        return [Path(r).expanduser().resolve() for r in self.roots if "://" not in r]


def get_settings() -> Settings:
    """The settings as the environment has them now (built again only when a
    ``FEATUREFLEET_*`` variable changed: a task reads them several times)."""
    return _settings(tuple(sorted((k, v) for k, v in os.environ.items()
                                  if k.startswith("FEATUREFLEET_"))))


@functools.lru_cache(maxsize=8)
def _settings(_env: tuple[tuple[str, str], ...]) -> Settings:
    return Settings()


BROKER_ENV = "FEATUREFLEET_BROKER_URL"
ALLOWED_ROOTS_ENV = "FEATUREFLEET_ALLOWED_ROOTS"
FLOWER_AUTH_ENV = "FEATUREFLEET_FLOWER_AUTH"
