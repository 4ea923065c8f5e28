"""Where the store's files live: one code path for local folders and object stores (fsspec).

A store root is a folder or an fsspec URL (``s3://bucket/prefix``, ``gs://...``). Every file
operation of the store goes through this module: :func:`filesystem` resolves a path to its
fsspec filesystem (``LocalFileSystem`` for plain paths), and :func:`publish` makes a staged file
visible at its final path all at once: a rename on a local disk (no-clobber when asked), one
object upload on an object store (an upload is visible only once complete).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.fsio import is_remote as is_remote
from pipeline.fsio import join as join


def filesystem(path: str | Path) -> Any:
    """The fsspec filesystem of ``path`` (local paths: ``LocalFileSystem``).

    Raises:
        StoreError: the URL's protocol needs a driver that is not installed.
    """
    import fsspec

    if not is_remote(path):
        return fsspec.filesystem("file")
    try:
        return fsspec.core.url_to_fs(str(path))[0]
    except (ImportError, ValueError) as exc:
        raise StoreError(f"store {str(path)!r} needs an fsspec driver ({exc}); fix: pip install "
                         "'featurefleet[s3]' (s3fs) or use a local folder") from None


def exists(path: str | Path) -> bool:
    try:
        return bool(filesystem(path).isfile(str(path)))
    except OSError:
        return False


def mtime(path: str | Path) -> float:
    """When the file was last written (seconds since the epoch)."""
    info = filesystem(path).info(str(path))
    when = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0
    return float(when.timestamp() if hasattr(when, "timestamp") else when)


@contextlib.contextmanager
def open_read(path: str | Path, block_size: int = 8 << 20) -> Iterator[Any]:
    """A binary file object for reading (object stores: ranged reads in blocks)."""
    fs = filesystem(path)
    kw = {"block_size": block_size} if is_remote(path) else {}
    with fs.open(str(path), "rb", **kw) as fh:
        yield fh


def read_text(path: str | Path) -> str | None:
    """A small file's text, or None when it does not exist.

    Raises:
        StoreError: the store cannot be reached.
    """
    try:
        return bytes(filesystem(path).cat_file(str(path))).decode()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors
        raise StoreError(f"cannot reach the store at {str(path)!r} ({type(exc).__name__}: "
                         f"{exc}); fix: check the URL, the credentials (AWS_ACCESS_KEY_ID, ...) "
                         "and the endpoint (AWS_ENDPOINT_URL)") from None


def write_text(path: str | Path, text: str) -> None:
    """Replace a small file whole (local: atomic rename; object store: one PUT)."""
    with staged(path) as tmp:
        tmp.write_text(text)
        publish(tmp, path)


def sha256_of(path: str | Path) -> str:
    """sha256 of a stored file (read through the store's filesystem)."""
    digest = hashlib.sha256()
    with open_read(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged(dest: str | Path) -> Iterator[Path]:
    """A local temporary path to write ``dest``'s content into: beside ``dest`` on a local
    disk (so publishing is a rename), in a temporary folder for an object store. Removed on
    exit if it was not published."""
    if is_remote(dest):
        with tempfile.TemporaryDirectory(prefix="ff-stage-") as local:
            yield Path(local) / Path(str(dest)).name
        return
    target = Path(dest)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create store folder {str(target.parent)!r} "
                         f"({exc.strerror or exc}); fix: set store to a writable folder") from None
    tmp = target.with_name(f".{target.name}.{_WRITER}-{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        sweep_temps(target)


_WRITER = socket.gethostname().replace(".", "_").replace("-", "_")[:40] or "host"


def sweep_temps(target: Path, age_s: float = 3600) -> int:
    """Remove debris of earlier writers of ``target``: temporary files whose writer process
    on this host is gone (killed mid-write, a full disk), or older than ``age_s`` (another
    host's). A live writer's file is never touched. Returns how many were removed."""
    removed = 0
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        parts = tmp.name[len(target.name) + 2:].split(".")
        writer = parts[0].rsplit("-", 1) if len(parts) >= 3 else []
        dead = False
        if len(writer) == 2 and writer[0] == _WRITER and writer[1].isdigit():
            dead = not _alive(int(writer[1]))
        with contextlib.suppress(OSError):
            if dead or is_stale_temp(tmp, age_s):
                tmp.unlink()
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staged_file: Path, dest: str | Path, *, clobber: bool = True) -> bool:
    """Make ``staged_file`` visible at ``dest`` in one step. Returns False (and publishes
    nothing) when ``clobber`` is off and ``dest`` already exists.

    Raises:
        StoreError: the upload or rename failed.
    """
    try:
        if is_remote(dest):
            fs = filesystem(dest)
            if not clobber and fs.exists(str(dest)):
                return False
            fs.put_file(str(staged_file), str(dest))  # one PUT: never half an object
            return True
        with open(staged_file, "rb+") as fh:
            os.fsync(fh.fileno())
        if not clobber:
            try:
                os.link(staged_file, dest)  # atomic, and fails if dest exists
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: fall through to a rename
                if Path(dest).exists():
                    return False
        os.replace(staged_file, dest)
        return True
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot write {str(dest)!r} ({type(exc).__name__}: "
                         f"{getattr(exc, 'strerror', None) or exc}); fix: check the store is "
                         "writable, has free space, and (object stores) the credentials") from None


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` (or check the bucket) and write + delete a probe file there.

    Raises:
        StoreError: not writable, naming the folder and the fix.
    """
    probe = join(folder, f".write-test-{uuid.uuid4().hex[:6]}")
    try:
        fs = filesystem(folder)
        if not is_remote(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"folder {str(folder)!r} is not writable ({type(exc).__name__}: "
                         f"{getattr(exc, 'strerror', None) or exc}); fix: choose another "
                         "output/store location or fix its permissions/credentials") from None


def is_stale_temp(path: Path, age_s: float = 3600) -> bool:
    """A writer's temporary file older than ``age_s``: debris of a crash."""
    return path.name.endswith(".tmp") and time.time() - path.stat().st_mtime > age_s
