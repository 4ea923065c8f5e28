"""Text sources (``source: text``): a table (CSV/TSV, JSONL, Parquet) with text, label and
optional split columns; a folder of ``<class>/*.txt`` files (optionally under ``train/``,
``val/``, ``test/``); or WebDataset tars with ``<key>.txt`` + ``<key>.cls`` members.

Like an unreadable image, a text that cannot be used is a recorded skip with its reason:
invalid UTF-8, binary content, empty. A row without a label is left out at planning and
listed in the plan's warnings. Over-long texts are truncated by the backbone at its token
limit and counted in the report.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, short
from pipeline.sources import (
    MAX_TABLE_BYTES,
    SPLIT_NAMES,
    Loaded,
    Source,
    class_index,
    digest_of,
    failure,
    files_under,
    register,
    subfolders,
)
from pipeline.sources.decode import SNIFF_BYTES, decode_text
from pipeline.sources.folder import file_stat
from pipeline.sources.manifest import cell
from pipeline.sources.tables import read_parquet
from pipeline.spec import DataSpec

TABLES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


def _refuse_binary(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if b"\0" in head and path.suffix.lower() != ".parquet":
        raise DataError(f"{str(path)!r} is a binary file, not text; fix: pass a UTF-8 .csv, "
                        ".tsv, .jsonl or .parquet file, or a folder of .txt files")


def read_table(path: Path, columns: Sequence[str] | None = None
               ) -> tuple[list[str], list[dict[str, Any]], str]:
    """(columns, rows, what a line number means) of a CSV/TSV, JSONL or Parquet file (of a
    Parquet file only ``columns``, when given, are decoded).

    Raises:
        DataError: too large (on disk, or once decoded), binary, malformed.
    """
    size = path.stat().st_size
    if size > MAX_TABLE_BYTES:
        raise DataError(f"{str(path)!r} is {size} bytes, over the {MAX_TABLE_BYTES}-byte limit "
                        "of one text table; fix: split it into smaller files, or write .tar "
                        "shards (source: text, path: 'data-{000..099}.tar')")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path, columns)
    _refuse_binary(path)
    # undecodable bytes survive as surrogates: that row is a recorded skip, not the file
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    if suffix in (".jsonl", ".ndjson"):
        import json

        rows, seen = [], {}
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{str(path)!r} line {n} is not JSON ({short(line, 40)}); fix: "
                                'one object per line, e.g. {"text": ..., "label": ...}') from None
            if not isinstance(row, dict):
                raise DataError(f"{str(path)!r} line {n} is not an object; fix: one object "
                                'per line, e.g. {"text": ..., "label": ...}')
            rows.append(row)
            seen.update(dict.fromkeys(row))
        return list(seen), rows, "line"
    try:
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = list(reader)
        return list(reader.fieldnames or []), rows, "data row"
    except csv.Error as exc:
        raise DataError(f"{str(path)!r} is not valid CSV ({exc}); fix: a header line, then one "
                        "text per row (quote texts that contain commas or newlines)") from None


class TextTable(Source):
    """Texts held in memory, one per labelled row of a table (or file of a folder)."""

    modality = "text"

    def __init__(self, what: str, texts: list[str], labels: list[str], ids: list[str],
                 splits: list[str], dropped: list[tuple[str, str]],
                 files: list[Path] | None = None, unlabeled: bool = False) -> None:
        if not texts:
            raise DataError(f"no labelled texts in {what}; fix: give every text a label "
                            f"({len(dropped)} row(s) had none)")
        self.what, self.texts, self.ids, self.files = what, texts, ids, files
        self.class_names, self.labels = class_index(labels)
        self._splits = np.asarray(splits)
        self.dropped = dropped  # (id, reason): rows left out before planning
        self.unlabeled_because: DataError | None = None
        if len(self.class_names) < 2 and not unlabeled:
            raise DataError(f"the labels of {what} have one value ({short(self.class_names[0])})"
                            "; fix: a classifier needs at least two classes — check "
                            "data.label_column names the label")

    def raw(self, index: int) -> bytes:
        if self.files is not None:
            return self.files[index].read_bytes()
        return self.texts[index].encode("utf-8", errors="surrogateescape")

    def stat(self, index: int) -> bytes:
        return file_stat(self.files[index]) if self.files is not None else self.raw(index)

    def sample_id(self, index: int) -> str:
        return self.ids[index]

    def text_length(self, index: int) -> int:
        """A cheap length (extraction sorts a shard's texts by it: less padding)."""
        if self.files is not None:
            return int(self.files[index].stat().st_size)
        return len(self.texts[index])

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        found = {s: np.flatnonzero(self._splits == s) for s in SPLIT_NAMES}
        found = {s: v for s, v in found.items() if len(v)}
        if not found:
            return None
        if "train" not in found:
            raise DataError(f"{self.what} has splits {sorted(found)} but no 'train'; fix: mark "
                            "training texts with split=train")
        return found

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        out = Loaded()
        for i in indices:
            try:
                raw = self.raw(int(i))
                out.images.append(decode_text(raw))
                out.indices.append(int(i))
                out.digests.append(digest_of(raw))
            except Exception as exc:  # a bad text is data, not a crash
                out.failures.append(failure(int(i), exc))
        return out


def table_source(path: Path, spec: DataSpec) -> TextTable:
    columns, rows, unit = read_table(path, [spec.text_column, spec.label_column,
                                            spec.split_column])
    missing = {option: DataError(f"{str(path)!r} has no column {column!r} (its columns: "
                                 f"{short(columns, 120)}); fix: set data.{option} to one of "
                                 "them") for option, column in (
        ("text_column", spec.text_column), ("label_column", spec.label_column))
        if column not in columns}
    if "text_column" in missing:
        raise missing["text_column"]
    if "label_column" in missing:  # only prediction reads texts without labels
        return unlabeled_table(path, rows, spec, unit, missing["label_column"])
    split_col = spec.split_column if spec.split_column in columns else None
    texts, labels, ids, splits, dropped = [], [], [], [], []
    for n, row in enumerate(rows, start=1):
        sid = f"{unit} {n}"
        label = cell(row, spec.label_column)
        if not label:
            dropped.append((sid, f"no {spec.label_column!r}"))
            continue
        split = cell(row, split_col) if split_col else ""
        if split and split not in SPLIT_NAMES:
            raise DataError(f"{str(path)!r} {sid}: unknown split {short(split)} in column "
                            f"{split_col!r}; fix: use one of {', '.join(SPLIT_NAMES)}")
        value = row.get(spec.text_column)
        if isinstance(value, (list, dict)):  # never the repr of a list as a "text"
            dropped.append((sid, f"{spec.text_column!r} is a {type(value).__name__}, not a "
                                 "text"))
            continue
        texts.append(value if isinstance(value, str) else "" if value is None else str(value))
        labels.append(label)
        ids.append(sid)
        splits.append(split)
    return TextTable(repr(str(path)), texts, labels, ids, splits, dropped)


def unlabeled_table(path: Path, rows: list[dict[str, Any]], spec: DataSpec, unit: str,
                    why: DataError) -> TextTable:
    """A table without a label column: every text, one class (what ``kind: predict`` reads);
    planning any other kind raises ``why`` (``Source.needs_labels``)."""
    texts, ids, dropped = [], [], []
    for n, row in enumerate(rows, start=1):
        value = row.get(spec.text_column)
        if isinstance(value, (list, dict)):
            dropped.append((f"{unit} {n}", f"{spec.text_column!r} is a {type(value).__name__}"
                                           ", not a text"))
            continue
        texts.append(value if isinstance(value, str) else "" if value is None else str(value))
        ids.append(f"{unit} {n}")
    table = TextTable(repr(str(path)), texts, ["unlabeled"] * len(texts), ids,
                      [""] * len(texts), dropped, unlabeled=True)
    table.unlabeled_because = why
    return table


def folder_source(root: Path) -> TextTable:
    """``root/<class>/*.txt`` or ``root/<split>/<class>/*.txt``."""
    tops = subfolders(root)
    split_layout = bool(tops) and {p.name for p in tops} <= set(SPLIT_NAMES)
    layouts = [(p.name, p) for p in tops] if split_layout else [("", root)]
    files, labels, splits = [], [], []
    for split, base in layouts:
        for class_dir in subfolders(base):
            for f in files_under(root, class_dir, (".txt",)):
                files.append(f)
                labels.append(class_dir.name)
                splits.append(split)
    if not files:
        raise DataError(f"no .txt files under {str(root)!r}; fix: one folder per class "
                        "holding .txt files (optionally under train/, val/, test/)")
    ids = [str(f.relative_to(root)) for f in files]
    return TextTable(repr(str(root)), [""] * len(files), labels, ids, splits, [], files=files)


@register("text")
def _text(spec: DataSpec) -> Source:
    where = str(spec.path)
    path = Path(where).expanduser()
    if where.endswith(".tar") or "{" in where or "://" in where:
        from pipeline.sources.webdataset import TarSource

        return TarSource(where, modality="text")
    if path.is_dir():
        return folder_source(path)
    if not path.is_file():
        raise DataError(f"text data {where!r} does not exist; fix: set data.path to a .csv, "
                        ".tsv, .jsonl or .parquet file, a folder of <class>/*.txt, or .tar "
                        "shards")
    if path.suffix.lower() not in TABLES:
        _refuse_binary(path)
        raise DataError(f"text data {where!r}: unknown table type {path.suffix!r}; fix: use "
                        f"one of {', '.join(TABLES)} (or a folder of .txt files)")
    return table_source(path, spec)
