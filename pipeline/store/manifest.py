"""The checksum manifest of a shard set (``manifest.json`` beside the shards).

It records, per shard file, the sha256 its writer computed when it wrote the file (never a
checksum computed later from whatever the file holds then: a file damaged after it was written
must not be blessed), the row count and the skipped samples, plus how the set was made. The
cache reuses a shard only when the file still has that checksum.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.store import files
from pipeline.store.shards import inspect, read_sidecar

MANIFEST = "manifest.json"


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """``{"shards": {file name: {"sha256", "rows", "skipped"}}, ...}`` of a shard set."""
    text = files.read_text(files.join(shard_dir, MANIFEST))
    try:
        raw = json.loads(text) if text else {}
    except ValueError:
        raw = {}
    if not (isinstance(raw, dict) and isinstance(raw.get("shards"), dict)):
        return {"shards": {}}
    return raw


def record(shard_dir: str | Path, entries: dict[str, dict[str, Any]],
           info: dict[str, Any]) -> None:
    """Merge writer-computed checksums (``{file name: {"sha256", "rows", "skipped"}}``) into
    the set's manifest and replace it whole."""
    current = read_manifest(shard_dir)
    current["shards"].update(entries)
    current.update(info, updated=time.time())
    files.write_text(files.join(shard_dir, MANIFEST), json.dumps(current, indent=1,
                                                                 sort_keys=True))


def writer_checksum(path: str | Path, manifest: dict[str, Any]) -> str | None:
    """The checksum the shard's writer recorded: in the set's manifest, else beside the
    shard (a job that failed before its manifest was written)."""
    entry = manifest["shards"].get(Path(str(path)).name) or read_sidecar(path)
    return str(entry["sha256"]) if entry and entry.get("sha256") else None


def trusted(path: str | Path, key: str, rows: int, manifest: dict[str, Any]) -> bool:
    """A shard the cache may reuse: complete, of this key, and still holding the checksum its
    writer recorded (a truncated, foreign or edited file fails)."""
    recorded = writer_checksum(path, manifest)
    return recorded is not None and inspect(path, key, rows) is not None \
        and files.sha256_of(path) == recorded
