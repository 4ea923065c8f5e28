"""The job view's page: recent jobs with their stage, progress, ETA and links to their pages
(rows from :func:`pipeline.jobs.progress.view_row`; served by ``featurefleet dashboard``)."""

from __future__ import annotations

import time
from typing import Any

from pipeline.reports.templating import render


def jobs_page(rows: list[dict[str, Any]], broker: str, prefix: str = "",
              refresh_s: int = 5, kept_days: int = 30) -> str:
    return render("jobs.html.j2", rows=rows, broker=broker, prefix=prefix,
                  refresh_s=refresh_s, kept_days=kept_days,
                  now=time.strftime("%H:%M:%S"))
