"""The Celery app. Configured lazily from ``workers.settings`` (broker URL from the env).

Workers run ``celery -A workers.app worker`` (or ``featurefleet worker``); clients that talk to
another broker make their own app with :func:`make_app` and send tasks by name. Every message
either app sends is size-checked first (:class:`CheckedAMQP`): bulk data goes through shared
storage, never through Redis.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Several worker processes share a host's cores (extraction, training, the ranks they start):
# OpenMP threads that spin while they wait would steal every core from the others (measured:
# 2 extraction workers on 2 cores ran 10x slower). Waiting threads sleep instead; read by
# OpenMP when torch first runs, so set before any task imports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery
from celery.app.amqp import AMQP

from pipeline.errors import BrokerError
from pipeline.settings import get_settings
from workers.settings import celery_config


def message_size(body: Any) -> int:
    """Bytes of a task message body as JSON (what the broker stores)."""
    return len(json.dumps(body, default=str))


class CheckedAMQP(AMQP):  # type: ignore[misc]
    """Refuses to publish a task message over $FEATUREFLEET_MAX_MESSAGE_BYTES."""

    def _create_task_sender(self) -> Any:
        send = super()._create_task_sender()

        def checked(producer: Any, name: str, message: Any, *args: Any, **kwargs: Any) -> Any:
            limit = get_settings().max_message_bytes
            size = message_size(message.body)
            if size > limit:
                raise BrokerError(f"task {name} would send a {size}-byte message (limit "
                                  f"{limit}); fix: keep bulk data in the store (a bug), or "
                                  "raise FEATUREFLEET_MAX_MESSAGE_BYTES")
            return send(producer, name, message, *args, **kwargs)

        return checked


app = Celery("featurefleet", include=["workers.tasks"], set_as_current=False,
             amqp=CheckedAMQP)
app.config_from_object("workers.settings")


def make_app(broker_url: str | None = None) -> Celery:
    """A client app for ``broker_url`` (tasks are addressed by name, not imported)."""
    client = Celery("featurefleet", set_as_current=False, amqp=CheckedAMQP)
    client.config_from_object(celery_config(broker_url))
    return client
