"""The job view inside Flower: ``/jobs`` (a page of recent jobs: kind, stage, progress, ETA,
status, links to each job's report and its comparison's leaderboard), ``/jobs.json``, and the
report files those links name. Behind Flower's authentication like every Flower page.

It reads the job records in Redis, so it lists jobs that finished before Flower started (Flower
itself knows only the task events it saw). Files are served only where a job record names
them (a report path written by a worker), never from a path in the URL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import JobError
from pipeline.jobs.progress import Throughput, view_row
from pipeline.jobs.records import FINAL, JOB_TTL_S, JobStore

ID = r"([A-Za-z0-9][A-Za-z0-9._:-]{0,127})"
SHOWN = 50  # jobs on the page, newest first
_throughput: dict[str, Throughput] = {}  # job id -> polls of this page (the ETA's window)
_store: list[JobStore] = []


def store() -> JobStore:
    from pipeline.jobs.broker import broker_url, connect

    if not _store:
        _store.append(JobStore(connect(broker_url(), check=False)))
    return _store[0]


def rows(jobs: JobStore, limit: int = SHOWN) -> list[dict[str, Any]]:
    """The page's rows; each call is a poll for the ETA from recent throughput."""
    out = []
    for st in jobs.recent(limit):
        tp = _throughput.setdefault(st["id"], Throughput())
        tp.observe(st)
        row = view_row(st, tp)
        if st.get("status") in FINAL:
            _throughput.pop(st["id"], None)
        cmp_id = st.get("compare_id")
        row["leaderboard"] = bool(cmp_id and jobs.comparison(str(cmp_id)).get("leaderboard"))
        out.append(row)
    return out


def file_for(jobs: JobStore, what: str, ident: str, name: str) -> tuple[Path, str] | None:
    """The file a record names for ``/jobs/<id>/<name>`` or ``/compare/<id>/<name>``, and its
    content type; None when there is none."""
    if what == "jobs" and name in ("report.html", "report.json", "flagged.csv"):
        try:
            report = jobs.get(ident).get("report")
        except JobError:
            return None
        if not report:
            return None
        path = Path(str(report)).with_name(name)
    elif what == "compare" and name in ("leaderboard.html", "leaderboard.json"):
        board = jobs.comparison(ident).get("leaderboard") if ident.startswith("cmp-") else None
        if not board:
            return None
        path = Path(str(board)).with_suffix(Path(name).suffix)
    else:
        return None
    kind = {"html": "text/html; charset=utf-8", "json": "application/json",
            "csv": "text/csv; charset=utf-8"}[name.rsplit(".", 1)[1]]
    return (path, kind) if path.is_file() else None


def handlers() -> list[tuple[str, Any]]:
    """Tornado handlers for Flower's application (its authentication applies)."""
    import tornado.web
    from flower.views import BaseHandler

    from pipeline.jobs.broker import broker_url, redact
    from pipeline.reports.jobs import jobs_page

    class JobsPage(BaseHandler):  # type: ignore[misc]
        @tornado.web.authenticated  # type: ignore[untyped-decorator]
        def get(self) -> None:
            prefix = self.application.options.url_prefix or ""
            prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
            try:  # ?refresh=0: no automatic reload (a script, a screenshot)
                refresh = max(0, min(3600, int(self.get_argument("refresh", "5") or 5)))
            except ValueError:
                refresh = 5
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.write(jobs_page(rows(store()), redact(broker_url()), prefix, refresh,
                                 kept_days=JOB_TTL_S // 86400))

    class JobsJson(BaseHandler):  # type: ignore[misc]
        @tornado.web.authenticated  # type: ignore[untyped-decorator]
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps(rows(store())))

    class JobFile(BaseHandler):  # type: ignore[misc]
        @tornado.web.authenticated  # type: ignore[untyped-decorator]
        def get(self, what: str, ident: str, name: str) -> None:
            found = file_for(store(), what, ident, name)
            if found is None:
                raise tornado.web.HTTPError(404, f"no {name} for {ident} (not finished?)")
            self.set_header("Content-Type", found[1])
            self.write(found[0].read_bytes())

    return [(r"/jobs/?", JobsPage), (r"/jobs\.json", JobsJson),
            (rf"/(jobs|compare)/{ID}/([a-z]+\.(?:html|json|csv))", JobFile)]


def install() -> None:
    """Add the job view to Flower's routes (before its catch-all "not found")."""
    from flower import urls

    routes = urls.handlers
    if not any(isinstance(h, tuple) and h[0] == r"/jobs/?" for h in routes):
        routes[-1:-1] = handlers()

