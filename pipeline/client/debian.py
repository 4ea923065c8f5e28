"""A real, labelled text set every Debian machine carries: the package index.

``apt-cache dumpavail`` lists every package with its ``Section`` (games, science, sound...)
and its description. :func:`write_debian_csv` turns it into ``text,label`` rows — the
description (summary + long text) and the section — for the text demo and the text benchmark.
Packages that share a description (``-dev``/``-dbg`` variants of one library) are kept once.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

SECTIONS = ("admin", "database", "editors", "games", "graphics", "mail", "net", "science",
            "sound", "text", "video", "web")


def packages(index: str) -> Iterator[dict[str, str]]:
    """The records of a Packages-format index as dicts (continuation lines joined)."""
    for block in index.split("\n\n"):
        rec: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                rec[key] += "\n" + ("" if line.strip() == "." else line.strip())
            elif ":" in line:
                key, _, value = line.partition(":")
                rec[key] = value.strip()
        if rec.get("Package"):
            yield rec


def dump_index() -> str:
    """``apt-cache dumpavail`` (the package index this machine knows).

    Raises:
        DataError: no apt on this machine, or an empty index.
    """
    apt = shutil.which("apt-cache")
    if apt is None:
        raise DataError("apt-cache not found: the text demo reads the Debian package index; "
                        "fix: run it on Debian/Ubuntu, or give your own CSV (data.source: text)")
    out = subprocess.run([apt, "dumpavail"], capture_output=True, text=True, check=False,
                         timeout=300).stdout
    if "Package:" not in out:
        raise DataError("apt-cache dumpavail printed no packages; fix: run apt-get update "
                        "first")
    return out


def write_debian_csv(path: str | Path, sections: Sequence[str] = SECTIONS, per_class: int = 300,
                     seed: int = 0, index: str | None = None) -> Path:
    """Write ``text,label,package`` rows: up to ``per_class`` seeded packages of each section."""
    by_section: dict[str, dict[str, str]] = {s: {} for s in sections}
    for rec in packages(index if index is not None else dump_index()):
        section = rec.get("Section", "").rsplit("/", 1)[-1]
        text = " ".join(rec.get("Description", "").split())
        if section in by_section and len(text) > 20:
            by_section[section].setdefault(text, rec["Package"])
    rng = np.random.default_rng(seed)
    rows = []
    for section, texts in by_section.items():
        items = sorted(texts.items())
        for k in rng.permutation(len(items))[:per_class]:
            text, package = items[int(k)]
            rows.append((text, section, package))
    if len({r[1] for r in rows}) < 2:
        raise DataError(f"the package index has fewer than two of the sections {list(sections)}"
                        "; fix: choose sections this index has")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label", "package"])
        w.writerows(rows)
    return out
