"""What planning leaves out before splitting: exact copies (one kept, conflicting labels all
out) and the samples a reviewer listed in ``quality.exclude_file``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.plan import Exclusion
from pipeline.sources import DIGEST_BYTES, Source
from pipeline.spec import DataSpec


def find_exclusions(source: Source, digest: np.ndarray, data: DataSpec) -> list[Exclusion]:
    """Samples with the same bytes: one copy is kept (the one in the most held-out predefined
    split: test, then val, then train; else the first), the others are excluded; samples with
    the same bytes but different labels are all excluded (``data.conflicts: exclude``).

    Raises:
        DataError: conflicting labels with ``data.conflicts: error``.
    """
    if data.duplicates == "keep" or len(digest) == 0:
        return []
    keys = np.ascontiguousarray(digest).view(f"V{DIGEST_BYTES}").ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    if len(repeated) == 0:
        return []
    rank = np.full(len(source), 3)
    predefined = source.predefined_splits() or {}
    for name, r in (("train", 2), ("val", 1), ("test", 0)):
        if name in predefined:
            rank[predefined[name]] = r
    groups: dict[int, list[int]] = {}
    for i in repeated:
        groups.setdefault(int(inverse[i]), []).append(int(i))
    out: list[Exclusion] = []
    for members in groups.values():
        names = sorted({source.class_names[int(source.labels[m])] for m in members})
        ids = [source.sample_id(m) for m in members]
        if len(names) > 1:
            if data.conflicts == "error":
                raise DataError(f"samples {ids[:4]} have the same content but the labels "
                                f"{names}; fix: correct the labels, or set data.conflicts: "
                                "exclude to leave them out")
            out += [Exclusion(index=m, id=i, kind="conflict",
                              reason=f"same content as {len(members) - 1} other sample(s) "
                                     f"labelled {', '.join(names)}")
                    for m, i in zip(members, ids, strict=True)]
            continue
        keep = min(members, key=lambda m: (int(rank[m]), m))
        out += [Exclusion(index=m, id=source.sample_id(m), kind="duplicate", twin=keep,
                          reason=f"exact duplicate of {source.sample_id(keep)}")
                for m in members if m != keep]
    return sorted(out, key=lambda e: e.index)


MAX_EXCLUDE_FILE = 64 << 20


def reviewed_exclusions(source: Source, path: str | None,
                        already: list[Exclusion]) -> tuple[list[Exclusion], list[str]]:
    """The samples ``quality.exclude_file`` lists (a CSV with a ``sample_id`` column, or one
    id per line), as exclusions, and a warning for ids the data does not have.

    Raises:
        DataError: the file is missing, too large, not UTF-8, or a CSV without ``sample_id``.
    """
    if not path:
        return [], []
    import csv

    p = Path(path)
    try:
        if p.stat().st_size > MAX_EXCLUDE_FILE:
            raise DataError(f"quality.exclude_file {path!r} is over {MAX_EXCLUDE_FILE >> 20} "
                            "MiB; fix: list only the samples to leave out")
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"quality.exclude_file {path!r} cannot be read "
                        f"({type(exc).__name__}); fix: pass a UTF-8 CSV with a sample_id "
                        "column, or one sample id per line") from None
    if p.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if p.suffix.lower() ==
                                ".tsv" else ",")
        if "sample_id" not in (reader.fieldnames or []):
            raise DataError(f"quality.exclude_file {path!r} has no sample_id column (its "
                            f"columns: {(reader.fieldnames or [])[:10]}); fix: keep the "
                            "sample_id column of the export")
        wanted = [_uncell(str(r["sample_id"] or "")) for r in reader]
    else:
        wanted = [line.strip() for line in text.splitlines() if line.strip()]
    index = {source.sample_id(i): i for i in range(len(source))}
    done = {e.index for e in already}
    out, unknown = [], []
    for sid in dict.fromkeys(w for w in wanted if w):
        i = index.get(sid)
        if i is None:
            unknown.append(sid)
        elif i not in done:
            out.append(Exclusion(index=i, id=sid, kind="reviewed",
                                 reason=f"listed in quality.exclude_file {p.name}"))
            done.add(i)
    warn = [f"{len(unknown)} sample id(s) of quality.exclude_file are not in the data, e.g. "
            f"{unknown[:3]}"] if unknown else []
    return out, warn


def _uncell(text: str) -> str:
    """A CSV cell as written by ``csv_cell`` back to its text (a formula guard removed)."""
    return text[1:] if text[:1] == "'" and text[1:2] in ("=", "+", "-", "@", "\t", "\r") \
        else text
