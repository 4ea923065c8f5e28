"""A CSV, JSONL or Parquet list of ``path,label[,split]``; relative paths resolve against the
file."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, short
from pipeline.sources import SPLIT_NAMES, Loaded, Source, class_index, register
from pipeline.sources.decode import read_bytes
from pipeline.sources.folder import decode_files, file_stat
from pipeline.sources.tables import read_parquet
from pipeline.spec import DataSpec

MAX_MANIFEST_BYTES = 2 << 30


def read_text(path: Path, what: str) -> str:
    """A text file as UTF-8 (a BOM is dropped); other encodings are a clear error."""
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise DataError(f"{what} {str(path)!r} is {size} bytes; fix: split it (at most "
                        f"{MAX_MANIFEST_BYTES} bytes)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                        f"{raw[exc.start:exc.start + 4]!r}); fix: save it as UTF-8") from None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV (with a header) or JSONL file, as dicts.

    Raises:
        DataError: not UTF-8, a malformed line, or no header (CSV).
    """
    if path.suffix.lower() == ".parquet":
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise DataError(f"manifest {str(path)!r} is {path.stat().st_size} bytes; fix: "
                            f"split it (at most {MAX_MANIFEST_BYTES} bytes)")
        names, rows, _ = read_parquet(path, ["path", "label", "split"])
        if not {"path", "label"} <= set(names):
            raise DataError(f"manifest {str(path)!r} has columns {names}; fix: give it "
                            "columns path, label[, split]")
        return rows
    text = read_text(path, "manifest")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"manifest {str(path)!r} line {n} is not JSON ({exc}); fix: one "
                                'object per line: {"path": ..., "label": ...}') from None
            if not isinstance(row, dict):
                raise DataError(f"manifest {str(path)!r} line {n} is not an object "
                                f"({short(row, 40)}); fix: one object per line: "
                                '{"path": ..., "label": ...}')
            rows.append(row)
        return rows
    try:
        reader = csv.DictReader(text.splitlines())
        fields = reader.fieldnames
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"manifest {str(path)!r} is not valid CSV ({exc}); fix: write a "
                        "header line path,label[,split] and one image per line") from None
    return [{"__fields__": fields or []}, *rows] if rows or fields else []


def cell(row: dict[str, Any], column: str) -> str:
    """A row's value as stripped text ('' when missing or null)."""
    value = row.get(column)
    if value is None or isinstance(value, (dict, list)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class ManifestSource(Source):
    """Images (or audio clips: every path an audio file) listed in a manifest file, never
    outside the manifest's folder."""

    def __init__(self, manifest: Path) -> None:
        if not manifest.is_file():
            raise DataError(f"manifest {str(manifest)!r} does not exist; fix: set data.path to a "
                            ".csv or .jsonl file with path,label[,split] columns")
        rows = read_rows(manifest)
        csv_file = bool(rows) and "__fields__" in rows[0]
        if csv_file:
            fields = rows[0]["__fields__"]
            rows = rows[1:]
            if not {"path", "label"} <= set(fields):
                raise DataError(f"manifest {str(manifest)!r} has columns {fields}; fix: start "
                                "it with a header line path,label[,split]")
        if not rows:
            raise DataError(f"manifest {str(manifest)!r} has no rows; fix: add one line per "
                            "image: path,label[,split]")
        root = manifest.parent.resolve()
        self.root = root
        self.files: list[Path] = []
        labels: list[str] = []
        splits: list[str] = []
        for n, row in enumerate(rows, start=2 if csv_file else 1):
            if None in row:  # csv: more cells than header columns
                raise DataError(f"manifest {str(manifest)!r} line {n} has more cells than the "
                                "header; fix: quote values that contain commas")
            missing = [c for c in ("path", "label") if not cell(row, c)]
            if missing:
                raise DataError(f"manifest {str(manifest)!r} line {n} lacks {missing} "
                                f"({short(row, 60)}); fix: give every line a path and a label")
            if "\0" in cell(row, "path"):
                raise DataError(f"manifest {str(manifest)!r} line {n}: path "
                                f"{short(cell(row, 'path'))} holds a NUL byte; fix: one real "
                                "file path per line")
            p = (root / cell(row, "path")).resolve()
            if not p.is_relative_to(root):
                raise DataError(f"manifest {str(manifest)!r} line {n}: path "
                                f"{short(cell(row, 'path'))} points outside {str(root)!r}; fix: "
                                "keep images under the manifest's folder")
            split = cell(row, "split") or "train"
            if split not in SPLIT_NAMES:
                raise DataError(f"manifest {str(manifest)!r} line {n}: unknown split "
                                f"{short(split)}; fix: use one of {', '.join(SPLIT_NAMES)}")
            self.files.append(p)
            labels.append(cell(row, "label"))
            splits.append(split)
        self.class_names, self.labels = class_index(labels)
        self._splits = np.asarray(splits)
        self._has_splits = any(cell(r, "split") for r in rows)
        self.manifest = manifest
        from pipeline.sources.audio import is_audio_path, soundfile_module

        audio = [is_audio_path(p.name) for p in self.files]
        if any(audio) and not all(audio):
            first = self.files[audio.index(True)].name
            other = self.files[audio.index(False)].name
            raise DataError(f"manifest {str(manifest)!r} mixes audio ({first!r}) and other files "
                            f"({other!r}); fix: one modality per manifest")
        if all(audio):
            soundfile_module()
            self.modality = "audio"

    def raw(self, index: int) -> bytes:
        return read_bytes(self.files[index])

    def stat(self, index: int) -> bytes:
        return file_stat(self.files[index])

    def predefined_splits(self) -> dict[str, np.ndarray] | None:
        if not self._has_splits:
            return None
        found = {s: np.flatnonzero(self._splits == s) for s in SPLIT_NAMES}
        found = {s: v for s, v in found.items() if len(v)}
        if "train" not in found:
            raise DataError(f"manifest {str(self.manifest)!r} has no 'train' rows; fix: mark "
                            "training images with split=train")
        return found

    def sample_id(self, index: int) -> str:
        return str(self.files[index].relative_to(self.root))

    def load(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        if self.modality == "audio":
            from pipeline.sources.audio import decode_clips

            return decode_clips([self.files[i] for i in indices], indices)
        return decode_files([self.files[i] for i in indices], indices, min_size)

    def load_encoded(self, indices: Sequence[int], min_size: int | None = None) -> Loaded:
        if self.modality == "audio":
            return self.load(indices)
        return decode_files([self.files[i] for i in indices], indices, min_size, encoded=True)


@register("manifest")
def _manifest(spec: DataSpec) -> Source:
    return ManifestSource(Path(str(spec.path)))
