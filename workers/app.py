"""The Celery app. Configured lazily from ``workers.settings`` (broker URL from the env).

Workers run ``celery -A workers.app worker`` (or ``featurefleet worker``); clients that talk to
another broker make their own app with :func:`make_app` and send tasks by name.
"""

from __future__ import annotations

from celery import Celery

from workers.settings import celery_config

app = Celery("featurefleet", include=["workers.tasks"], set_as_current=False)
app.config_from_object("workers.settings")


def make_app(broker_url: str | None = None) -> Celery:
    """A client app for ``broker_url`` (tasks are addressed by name, not imported)."""
    client = Celery("featurefleet", set_as_current=False)
    client.config_from_object(celery_config(broker_url))
    return client
