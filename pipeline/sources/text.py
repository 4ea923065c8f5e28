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
from pipeline.sources import SPLIT_NAMES, Loaded, Source, class_index, digest_of, failure, register
from pipeline.sources.decode import SNIFF_BYTES, decode_text
from pipeline.sources.folder import file_stat
from pipeline.sources.manifest import MAX_MANIFEST_BYTES, cell
from pipeline.spec import DataSpec

TABLES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


def _refuse_binary(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if b"\0" in head and path.suffix.lower() != ".parquet":
        raise DataError(f"{str(path)!r} is a binary file, not text; fix: pass a UTF-8 .csv, "
                        ".tsv, .jsonl or .parquet file, or a folder of .txt files")


def read_table(path: Path) -> tuple[list[str], list[dict[str, Any]], str]:
    """(columns, rows, what a line number means) of a CSV/TSV, JSONL or Parquet file.

    Raises:
        DataError: too large, binary, malformed.
    """
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise DataError(f"{str(path)!r} is {size} bytes; fix: split it into files of at most "
                        f"{MAX_MANIFEST_BYTES} bytes")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{str(path)!r} is not a readable Parquet file "
                            f"({type(exc).__name__}); fix: write it with pyarrow or pandas"
                            ) from None
        return list(table.column_names), table.to_pylist(), "row"
    _refuse_binary(path)
    # undecodable bytes survive as surrogates: that row is a recorded skip, not the file
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    if suffix in (".jsonl", ".ndjson"):
        import json

        rows, columns = [], {}
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
            columns.update(dict.fromkeys(row))
        return list(columns), rows, "line"
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
                 files: list[Path] | None = None) -> None:
        if not texts:
            raise DataError(f"no labelled texts in {what}; fix: give every text a label "
                            f"({len(dropped)} row(s) had none)")
        self.what, self.texts, self.ids, self.files = what, texts, ids, files
        self.class_names, self.labels = class_index(labels)
        self._splits = np.asarray(splits)
        self.dropped = dropped  # (id, reason): rows left out before planning
        if len(self.class_names) < 2:
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
    columns, rows, unit = read_table(path)
    for option, column in (("text_column", spec.text_column),
                           ("label_column", spec.label_column)):
        if column not in columns:
            raise DataError(f"{str(path)!r} has no column {column!r} (its columns: "
                            f"{short(columns, 120)}); fix: set data.{option} to one of them")
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
        texts.append(value if isinstance(value, str) else "" if value is None else str(value))
        labels.append(label)
        ids.append(sid)
        splits.append(split)
    return TextTable(repr(str(path)), texts, labels, ids, splits, dropped)


def folder_source(root: Path) -> TextTable:
    """``root/<class>/*.txt`` or ``root/<split>/<class>/*.txt``."""
    tops = sorted(p for p in root.iterdir() if p.is_dir())
    split_layout = bool(tops) and {p.name for p in tops} <= set(SPLIT_NAMES)
    layouts = [(p.name, p) for p in tops] if split_layout else [("", root)]
    files, labels, splits = [], [], []
    for split, base in layouts:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*.txt")):
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
