"""Running models in a worker process: the device, cached models, out-of-memory halving,
autocast, and decoding ahead of the model in threads.

Prefork Celery children may not start DataLoader worker processes, so decoding of the next
batches runs in a thread pool while the current batch goes through the network (torch releases
the GIL). Models are cached per process, so a worker pays for loading one once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import backbones
from pipeline.sources import Loaded, Source

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """GPU indices on this machine, found without initialising CUDA in this process
    (a forked pool child could not use CUDA afterwards)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True)
            return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    proc = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(proc.iterdir())))] if proc.is_dir() else []


def pick_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu`` (called in the child)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def cached_backbone(name: str, weights: str | None, device: str,
                    use_compile: bool = False) -> backbones.Backbone:
    """The frozen backbone on ``device`` (channels_last), built once per worker process."""
    import torch

    bb = backbones.load_backbone(name, weights, device)
    bb.model = bb.model.to(memory_format=torch.channels_last)
    if use_compile:  # compiled lazily on the first batch, once per worker process
        bb.model = torch.compile(bb.model, dynamic=True)  # type: ignore[assignment]
    return bb


# Largest batch that fit on each device for each model input, per worker process: a batch
# that ran out of memory is halved and retried, and later batches start at the size that fit.
_FITS: dict[tuple[str, str, int], int] = {}


def fitted_batch(key: tuple[str, str, int]) -> int | None:
    return _FITS.get(key)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc)
                                           or "can't allocate memory" in str(exc)))


def forward_halving(fn: Callable[[Any], Any], x: Any, key: tuple[str, str, int]) -> Any:
    """``fn(x)`` in slices no larger than the size known to fit; on out-of-memory halve the
    slice and retry it (down to one sample, then the error stands)."""
    import torch

    outs, i, n = [], 0, len(x)
    while i < n:
        size = min(_FITS.get(key, n), n - i)
        try:
            outs.append(fn(x[i: i + size]))
        except Exception as exc:
            if not is_oom(exc) or size == 1:
                raise
            _FITS[key] = size // 2
            log.warning("out of memory at batch %d for %s; retrying at %d", size, key[0],
                        size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += size
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def autocast_dtype(device: str, precision: str) -> Any:
    """The autocast dtype for ``precision`` on ``device`` (None: run in fp32)."""
    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def decode_threads(device: str) -> int:
    """Decode threads ahead of the model: on CPU one keeps up and leaves the cores to the
    forward pass; a GPU worker needs several to keep the device fed."""
    return 1 if device == "cpu" else max(2, min(8, (os.cpu_count() or 2)))


def decoded(source: Source, indices: Sequence[int], batch_size: int, threads: int,
            min_size: int | None = None, encoded: bool = False) -> Iterator[Loaded]:
    """Yield decoded batches, with up to ``threads`` batches decoded ahead in threads
    (``encoded``: JPEGs read but left for :func:`decoded_on` to decode on the GPU).

    Only decoding runs in the threads: torch ops called from a helper thread start their own
    OpenMP team, which fights the forward pass's team for the cores. Resizing runs in the
    caller's thread (on the device when it is a GPU).
    """
    chunks = [list(indices[i: i + batch_size]) for i in range(0, len(indices), batch_size)]

    load = source.load_encoded if encoded else source.load

    def work(chunk: list[int]) -> Loaded:
        return load([int(i) for i in chunk], min_size)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ff-decode") as pool:
        pending: list[Future[Loaded]] = []
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            if len(pending) > threads:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def decoded_on(device: str, loaded: Loaded, min_size: int | None = None) -> Loaded:
    """``loaded`` with its undecoded JPEGs decoded on ``device`` in one batched call (HWC
    uint8 tensors there); what no decoder can read becomes a recorded failure."""
    from pipeline.sources.decode import decode_on_device

    images, failures = decode_on_device(loaded.images, device, min_size)
    bad = {k for k, _ in failures}
    keep = [k for k in range(len(loaded.indices)) if k not in bad]
    return Loaded(indices=[loaded.indices[k] for k in keep], images=images,
                  failures=[*loaded.failures, *((loaded.indices[k], why) for k, why in failures)],
                  digests=[loaded.digests[k] for k in keep])
