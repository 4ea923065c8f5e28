"""A job's progress in words, from its record: the progress line the command line prints and
the job view shows, the fraction done, and the rate and ETA from recent throughput."""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class Throughput:
    """Samples per second over the last ``window_s`` seconds of polls (not since the start:
    a job that slowed down, or a stuck shard, shows in the ETA at once)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self.points: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.points and done < self.points[-1][1]:
            self.points.clear()  # a new stage counts again from zero
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window_s:
            self.points.popleft()

    def observe(self, st: dict[str, Any]) -> None:
        """A poll of a job record: extraction's count counts (other stages have no rate)."""
        if st.get("stage") == "extract":
            self.add(int(st.get("images_done") or 0))

    def recent(self) -> tuple[float, float] | None:
        """(samples per second, seconds observed) over the window; None before 2 polls."""
        if len(self.points) < 2:
            return None
        (t0, d0), (t1, d1) = self.points[0], self.points[-1]
        return ((d1 - d0) / (t1 - t0), t1 - t0) if t1 > t0 else None

    def stalled_s(self) -> float:
        """How long the count has not moved (0 while it moves)."""
        if not self.points:
            return 0.0
        t_last, d_last = self.points[-1]
        since = t_last
        for t, d in reversed(self.points):
            if d != d_last:
                break
            since = t
        return t_last - since


def format_progress(st: dict[str, Any], throughput: Throughput | None = None) -> str:
    """The progress line of a job record; with ``throughput`` (the polls seen so far) the rate
    and ETA are the recent ones and a count that stopped moving says so instead of an ETA."""
    if st.get("kind") == "pretrain":
        return _training_progress(st, "pretrain")
    if st.get("strategy") == "finetune":
        return _training_progress(st, "finetune")
    total = int(st.get("images_total") or 0)
    what, per_s = {"text": ("texts", "txt/s"), "audio": ("clips", "clips/s")}.get(
        str(st.get("modality")), ("images", "img/s"))
    done = min(int(st.get("images_done") or 0), total)
    width = 24
    fill = int(width * done / total) if total else 0
    ips, eta = _rate_eta(st, throughput)
    rate = f"  {ips:6.1f} {per_s}" if ips is not None else ""
    eta = f"  {eta}" if eta else ""
    skipped = int(st.get("images_skipped") or 0)
    fails = f"  skipped {skipped}" if skipped else ""
    if st.get("stage") == "quality":  # after extraction: the data-quality stage's parts
        parts = int(st.get("quality_parts_total") or 0)
        got = min(parts, int(st.get("quality_parts_done") or 0))
        fill = int(width * got / parts) if parts else width
        return (f"[{'#' * fill}{'-' * (width - fill)}] {st.get('status', '?'):8} quality  "
                f"parts {got}/{parts}" + (" (reused from the store)" if not parts else "")
                + f"  {what} {done}/{total} extracted{fails}")
    return (f"[{'#' * fill}{'-' * (width - fill)}] {st.get('status', '?'):8} "
            f"{st.get('stage', ''):8} shards {st.get('shards_done', 0)}/"
            f"{int(st.get('shards_total', 0)) - int(st.get('shards_cached', 0))} "
            f"(+{st.get('shards_cached', 0)} cached)  {what} {done}/{total}{rate}{eta}{fails}")


def _duration(seconds: int) -> str:
    return f"{seconds}s" if seconds < 120 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds < 7200 else
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m")


def _training_progress(st: dict[str, Any], program: str) -> str:
    p = st.get(program) or {}
    epochs, steps = int(p.get("epochs") or 0), int(p.get("steps") or 0)
    done = (int(p.get("epoch") or 1) - 1) * steps + int(p.get("step") or 0) if steps else 0
    width = 24
    fill = int(width * done / (epochs * steps)) if epochs and steps else 0
    resumes = int(st.get("resumes") or 0)
    val = p.get("val_top1")  # fine-tuning validates every epoch; pretraining has its kNN
    return (f"[{'#' * fill}{'-' * (width - fill)}] {st.get('status', '?'):8} "
            f"{st.get('stage', ''):8} epoch {p.get('epoch', 0)}/{epochs} step "
            f"{p.get('step', 0)}/{steps}  loss {p.get('loss', '-')}  "
            + ("" if program == "pretrain" else
               f"val top-1 {'-' if val is None else f'{val:.3f}'}  ")
            + f"{p.get('images_per_s') or 0:.1f} img/s on {p.get('ranks', 1)} rank(s)"
            + (f"  resumed {resumes}x" if resumes else ""))


def fraction(st: dict[str, Any]) -> float:
    """How much of the job is done, 0..1, by its current stage (1 once it succeeded)."""
    if st.get("status") == "SUCCESS":
        return 1.0
    program = "pretrain" if st.get("kind") == "pretrain" else (
        "finetune" if st.get("strategy") == "finetune" else None)
    if program:
        p = st.get(program) or {}
        epochs, steps = int(p.get("epochs") or 0), int(p.get("steps") or 0)
        done = (int(p.get("epoch") or 1) - 1) * steps + int(p.get("step") or 0)
        return min(1.0, done / (epochs * steps)) if epochs and steps else 0.0
    if st.get("stage") == "quality":
        parts = int(st.get("quality_parts_total") or 0)
        return min(1.0, int(st.get("quality_parts_done") or 0) / parts) if parts else 1.0
    total = int(st.get("images_total") or 0)
    return min(1.0, int(st.get("images_done") or 0) / total) if total else 0.0


def _rate_eta(st: dict[str, Any], throughput: Throughput | None) -> tuple[float | None, str]:
    """Extraction's samples per second (None before any) and its ETA ("ETA 3m05s", "no
    progress for 40s" or ""): the recent rate once 5 s were observed, else the average."""
    total = int(st.get("images_total") or 0)
    done = min(int(st.get("images_done") or 0), total)
    started = st.get("started")
    if not (started and done):
        return None, ""
    recent = throughput.recent() if throughput is not None else None
    elapsed = (st.get("extract_finished") or time.time()) - float(started)
    ips = done / elapsed if elapsed > 0 else 0.0
    if recent is not None and recent[1] >= 5 and done < total:
        ips = recent[0]  # at least 5 s observed: the recent rate, not the average
    stalled = throughput.stalled_s() if throughput is not None else 0.0
    eta = ""
    if done < total and stalled >= 15:
        eta = f"no progress for {int(stalled)}s"
    elif done < total and ips > 0:
        eta = f"ETA {_duration(int((total - done) / ips))}"
    return (ips if ips > 0 or recent is not None else None), eta


def eta_text(st: dict[str, Any], throughput: Throughput | None = None) -> str:
    """The ETA part of the progress line alone ("ETA 3m05s", "no progress for 40s" or "")."""
    if st.get("kind") == "pretrain" or st.get("strategy") == "finetune":
        return ""
    return _rate_eta(st, throughput)[1]


def _counts(line: str, st: dict[str, Any]) -> str:
    """The progress line without its bar, status and stage (the view has columns for them)."""
    text = line.split("] ", 1)[-1].strip()
    for word in (str(st.get("status") or ""), str(st.get("stage") or "")):
        if word and text.startswith(word):
            text = text[len(word):].strip()
    return text


def view_row(st: dict[str, Any], throughput: Throughput | None = None) -> dict[str, Any]:
    """One job as the job view lists it: what it is, where it is, and which pages it has."""
    kind = str(st.get("kind") or "classify")
    what = kind if kind != "classify" else f"classify ({st.get('strategy') or 'probe'})"
    created = float(st.get("created") or 0)
    end = float(st.get("finished") or 0) or (time.time() if st.get("status") not in
                                                 ("SUCCESS", "FAILED", "CANCELLED") else 0)
    return {"id": st["id"], "name": str(st.get("name") or ""), "kind": what,
            "backbone": str(st.get("backbone") or ""), "status": str(st.get("status") or "?"),
            "stage": str(st.get("stage") or ""), "percent": round(100 * fraction(st)),
            "progress": _counts(format_progress(st, throughput), st),
            "eta": eta_text(st, throughput) if st.get("status") == "RUNNING" else "",
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)),
            "duration_s": round(end - created) if created and end else None,
            "top1": st.get("top1"), "error": str(st.get("error") or ""),
            "compare_id": st.get("compare_id"), "report": bool(st.get("report"))}
