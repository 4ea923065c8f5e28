"""Flower, the fleet's dashboard: its command line with authentication required, and asking
the workers online to send task events now.

Flower serves ``/metrics`` without authentication by design; ``python -m workers.dashboard``
runs Flower with that handler behind the same basic auth as every other page (Prometheus
scrapes with ``basic_auth``), and with the job view (``/jobs``, :mod:`workers.jobview`). Only
``/healthcheck`` (it answers "OK") stays open."""

from __future__ import annotations

import os
import sys

from pipeline.errors import FeaturefleetError
from pipeline.settings import BROKER_ENV, FLOWER_AUTH_ENV
from workers.launcher import ROOT


def dashboard(broker: str, address: str = "127.0.0.1", port: int = 5555,
              auth: str | None = None, allow_no_auth_on_loopback: bool = False,
              read_only: bool = False) -> tuple[list[str], dict[str, str]]:
    """Flower's command line and environment for this broker.

    Authentication is required: basic auth (``user:password``; passed in the environment, not
    on the command line, so ``ps`` does not show it). Without it Flower starts only on a
    loopback address and only when the caller says so explicitly.

    Raises:
        FeaturefleetError: no auth where auth is required, or a malformed ``auth``.
    """
    loopback = address in ("127.0.0.1", "localhost", "::1")
    env = {**os.environ, BROKER_ENV: broker,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("FLOWER_UNAUTHENTICATED_API", None)  # the HTTP API can send tasks: never open it
    if auth:
        if ":" not in auth or auth.startswith(":") or auth.endswith(":"):
            raise FeaturefleetError("dashboard auth must be user:password; fix: set "
                                    f"{FLOWER_AUTH_ENV}=user:password or pass --auth")
        env["FLOWER_BASIC_AUTH"] = auth
    elif not (loopback and allow_no_auth_on_loopback):
        raise FeaturefleetError(
            f"the dashboard needs authentication (address {address}); fix: set "
            f"{FLOWER_AUTH_ENV}=user:password (or --auth), or on a loopback address pass "
            "--no-auth-on-loopback")
    argv = [sys.executable, "-m", "workers.dashboard", "-A", "workers.app", "flower",
            f"--address={address}", f"--port={port}"]
    if read_only:
        argv.append("--read_only")
    return argv, env


def enable_task_events(broker: str, timeout: float = 2.0) -> int:
    """Ask the workers online to send task events now (what Flower asks every 5 s); returns
    how many answered. Workers started later are asked by Flower."""
    from workers.app import make_app

    app = make_app(broker)
    try:
        return len(app.control.enable_events(reply=True, timeout=timeout) or [])
    finally:
        app.close()


def protect_metrics() -> None:
    """Put Flower's ``/metrics`` behind its authentication, like its other pages."""
    import tornado.web
    from flower.views import monitor

    monitor.Metrics.get = tornado.web.authenticated(monitor.Metrics.get)


if __name__ == "__main__":  # `celery ... flower`, with /metrics authenticated
    from celery.__main__ import main

    from workers.jobview import install

    protect_metrics()
    install()  # /jobs: the job records, beside Flower's tasks
    sys.argv[0] = "celery"
    main()
