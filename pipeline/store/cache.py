"""The feature store seen as a cache: list, verify and remove shard sets.

A shard set is ``<store>/<backbone>/<key prefix>/`` with its ``manifest.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.store import files
from pipeline.store.manifest import read_manifest, writer_checksum
from pipeline.store.shards import inspect


def shard_sets(root: str | Path) -> list[Path]:
    if files.is_remote(root):
        raise StoreError(f"featurefleet cache works on local stores, not {str(root)!r}; fix: "
                         "list the bucket with its own tools (aws s3 ls), or mount it")
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"feature store {str(root)!r} does not exist; fix: pass --store with "
                         "the folder a job used (its spec's store, default <output>/store)")
    return sorted(p for p in root.glob("*/*") if p.is_dir())


def ls(root: str | Path) -> list[dict[str, Any]]:
    """One summary per shard set."""
    out = []
    for d in shard_sets(root):
        m = read_manifest(d)
        shard_files = sorted(d.glob("*.h5"))
        out.append({
            "set": f"{d.parent.name}/{d.name}", "path": str(d), "backbone": d.parent.name,
            "shards": len(shard_files),
            "rows": sum(e.get("rows", 0) for e in m["shards"].values()),
            "bytes": sum(f.stat().st_size for f in shard_files),
            "source": (m.get("data") or {}).get("source"),
            "weights": m.get("weights_id"), "crop": (m.get("preprocessing") or {}).get("crop")
            or (m.get("preprocessing") or {}).get("max_length"),
            "preprocessing": m.get("preprocessing") or {},
            "updated": m.get("updated"),
        })
    return out


def verify(root: str | Path, fix: bool = False) -> list[dict[str, Any]]:
    """Check every shard file against its set's manifest; with ``fix`` delete the bad ones."""
    problems = []
    for d in shard_sets(root):
        m = read_manifest(d)
        key = m.get("key")
        for f in sorted(d.iterdir()):
            reason = None
            if f.name.endswith(".tmp"):
                # A writer's temp file; only stale ones (an hour old) are debris of a crash.
                if files.is_stale_temp(f):
                    reason = "stale temporary file"
            elif f.suffix == ".h5":
                recorded = writer_checksum(f, m)
                if recorded is None:
                    reason = "no checksum from its writer (written by an older version?)"
                elif inspect(f, str(key) if key else None, None) is None:
                    reason = "incomplete, unreadable or of another key"
                elif files.sha256_of(f) != recorded:
                    reason = "checksum differs from the one its writer recorded"
            if reason:
                problems.append({"path": str(f), "problem": reason, "removed": fix})
                if fix:
                    f.unlink(missing_ok=True)
                    (f.parent / f".{f.name}.json").unlink(missing_ok=True)
    return problems


def rm(root: str | Path, selector: str | None = None, everything: bool = False) -> list[str]:
    """Remove shard sets whose ``backbone/key`` starts with ``selector`` (or all of them)."""
    if not selector and not everything:
        raise StoreError("nothing selected; fix: name a set (as featurefleet cache ls prints "
                         "it, or a prefix such as a backbone name), or pass --all")
    removed = []
    for d in shard_sets(root):
        name = f"{d.parent.name}/{d.name}"
        if everything or (selector and name.startswith(selector)):
            shutil.rmtree(d)
            removed.append(name)
    if selector and not removed:
        raise StoreError(f"no shard set matches {selector!r}; fix: use a name from "
                         "featurefleet cache ls")
    return removed
