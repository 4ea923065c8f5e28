"""Inline SVG plots for the HTML reports (no scripts, no external files): confusion matrix,
regularization sweep, per-class F1 bars. Every text is escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any


def _esc(v: Any) -> str:
    return html.escape(str(v))


def confusion_svg(cm: list[list[int]] | None, names: list[str], size: int = 420) -> str:
    """The confusion matrix as a heat map ("" when the report holds none: too many classes,
    the page shows the most frequent confusions instead)."""
    if not cm:
        return ""
    k = len(cm)
    if k == 0:
        return ""
    pad = 60
    cell = (size - pad) / k
    rows = [sum(r) or 1 for r in cm]
    parts = [f'<svg id="confusion" xmlns="http://www.w3.org/2000/svg" width="{size + 10}" '
             f'height="{size + 30}" role="img" aria-label="confusion matrix">']
    for i in range(k):
        for j in range(k):
            frac = cm[i][j] / rows[i]
            light = int(255 - 200 * frac)
            x, y = pad + j * cell, pad + i * cell
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                         f'fill="rgb({light},{light},255)" stroke="#fff"/>')
            if cm[i][j] and cell >= 16:
                color = "#fff" if frac > 0.6 else "#222"
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                             f'text-anchor="middle" fill="{color}">{cm[i][j]}</text>')
        label = _esc(names[i])[:8]
        parts.append(f'<text x="{pad - 4}" y="{pad + (i + 0.5) * cell + 4:.1f}" '
                     f'text-anchor="end">{label}</text>')
        parts.append(f'<text x="{pad + (i + 0.5) * cell:.1f}" y="{pad - 6}" '
                     f'text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{pad + (size - pad) / 2}" y="14" text-anchor="middle">predicted</text>')
    parts.append(f'<text x="12" y="{pad + (size - pad) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {pad + (size - pad) / 2})">true</text>')
    parts.append("</svg>")
    return "".join(parts)


Scale = Callable[[float], float]


def _axes(xr: tuple[float, float], yr: tuple[float, float], size: tuple[int, int],
          margins: tuple[int, int, int, int]) -> tuple[Scale, Scale]:
    """Data -> pixel maps for a plot of ``size`` (w, h) with margins (left, right, top,
    bottom); y grows upwards."""
    (x0, x1), (y0, y1), (w, h), (left, right, top, bottom) = xr, yr, size, margins

    def sx(v: float) -> float:
        return float(left + (v - x0) / ((x1 - x0) or 1) * (w - left - right))

    def sy(v: float) -> float:
        return float(top + (1 - (v - y0) / ((y1 - y0) or 1)) * (h - top - bottom))

    return sx, sy


def sweep_svg(sweep: dict[str, Any] | None, w: int = 480, h: int = 300) -> str:
    if not sweep or not sweep.get("curve"):
        return '<p class="muted">fixed L2 penalty: no sweep</p>'
    pts = sorted(sweep["curve"], key=lambda p: p["l2"])
    lx = [math.log10(p["l2"]) for p in pts]
    ys = [p["val_top1"] for p in pts]
    x0, x1 = min(lx), max(lx)
    y0, y1 = min(ys), max(ys)
    y0, y1 = max(0.0, y0 - 0.02), min(1.0, y1 + 0.02)
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.05, y1 + 0.05
    L, R, T, B = 50, 15, 15, 40
    sx, sy = _axes((x0, x1), (y0, y1), (w, h), (L, R, T, B))
    line = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(lx, ys, strict=True))
    parts = [f'<svg id="sweep" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'role="img" aria-label="regularization sweep">',
             f'<line x1="{L}" y1="{h - B}" x2="{w - R}" y2="{h - B}" stroke="#999"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h - B}" stroke="#999"/>']
    for e in range(math.ceil(x0), math.floor(x1) + 1, 2):
        parts.append(f'<text x="{sx(e):.1f}" y="{h - B + 14}" text-anchor="middle">1e{e}</text>')
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{L - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
    parts.append(f'<polyline points="{line}" fill="none" stroke="#2b6cb0" stroke-width="2"/>')
    for a, b in zip(lx, ys, strict=True):
        parts.append(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.5" fill="#2b6cb0"/>')
    c = math.log10(sweep["chosen_l2"])
    parts.append(f'<line x1="{sx(c):.1f}" y1="{T}" x2="{sx(c):.1f}" y2="{h - B}" '
                 'stroke="#e53e3e" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{(L + w - R) / 2}" y="{h - 6}" text-anchor="middle">L2 penalty λ '
                 f'(chosen {sweep["chosen_l2"]:.3g}, red)</text>')
    parts.append("</svg>")
    return "".join(parts)


MAX_BARS = 40  # per-class bars drawn: above it, the lowest and highest F1 only


def f1_svg(per_class: dict[str, dict[str, float]], w: int = 480) -> str:
    names = list(per_class)
    if len(names) > MAX_BARS:  # a page stays small at any class count
        ranked = sorted(names, key=lambda n: per_class[n]["f1"])
        names = ranked[:MAX_BARS // 2] + ranked[-(MAX_BARS // 2):]
    bar, gap, L = 16, 4, 70
    h = len(names) * (bar + gap) + 30
    parts = [f'<svg id="f1" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'role="img" aria-label="per-class F1">']
    for i, n in enumerate(names):
        f1 = per_class[n]["f1"]
        y = 10 + i * (bar + gap)
        parts.append(f'<text x="{L - 6}" y="{y + 12}" text-anchor="end">{_esc(n)[:10]}</text>')
        parts.append(f'<rect x="{L}" y="{y}" width="{f1 * (w - L - 50):.1f}" height="{bar}" '
                     'fill="#38a169"/>')
        parts.append(f'<text x="{L + f1 * (w - L - 50) + 4:.1f}" y="{y + 12}">{f1:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


COLOURS = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5")


def curve_svg(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
              name: str, w: int = 480, h: int = 280) -> str:
    """Line plot of one or more named series of (x, y) points, with a legend."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    L, R, T, B = 55, 15, 15, 40
    sx, sy = _axes((x0, x1), (y0, y1), (w, h), (L, R, T, B))
    parts = [f'<svg id="{_esc(name)}" xmlns="http://www.w3.org/2000/svg" width="{w}" '
             f'height="{h}" role="img" aria-label="{_esc(ylabel)}">',
             f'<line x1="{L}" y1="{h - B}" x2="{w - R}" y2="{h - B}" stroke="#999"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h - B}" stroke="#999"/>']
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{L - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    parts.append(f'<text x="{(L + w - R) / 2}" y="{h - 8}" text-anchor="middle">'
                 f'{_esc(xlabel)}</text>')
    for n, (label, pts) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        line = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{w - R - 5}" y="{T + 12 + 14 * n}" text-anchor="end" '
                     f'fill="{colour}">{_esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
