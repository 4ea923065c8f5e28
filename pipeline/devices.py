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
import time
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
        t0 = time.thread_time()
        out = load([int(i) for i in chunk], min_size)
        out.cpu_seconds = time.thread_time() - t0
        return out

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ff-decode") as pool:
        pending: list[Future[Loaded]] = []
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            if len(pending) > threads:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


# Forward-pass threads that won the trial of :class:`CoreSplit`, per worker process and key.
_SPLITS: dict[tuple[Any, ...], int] = {}


class CoreSplit:
    """The CPU cores split between decoding and the forward pass, by measurement.

    On a CPU worker, a forward pass on every core fights the decoding thread for a core:
    each slows the other (12 MP JPEGs: ~30 ms of decoding per image). When decoding costs a
    real share of a batch's time, the next batches run the forward pass on every core and
    then on one fewer (decoding keeps a core to itself), ``TRIAL`` batches each, and the
    faster keeps running — for this shard and, remembered per ``key``, for the next ones.
    Cheap decoding (small images) never triggers the trial.
    """

    TRIAL = 3
    DECODE_SHARE = 0.15  # a batch's decoding CPU time over its wall time: above it, try it

    def __init__(self, device: str, key: tuple[Any, ...]) -> None:
        import torch

        self.torch, self.key = torch, key
        self.start = torch.get_num_threads()
        self.active = device == "cpu" and self.start >= 2
        self.trial: list[int] = []  # thread counts to try, in order
        self.rates: dict[int, list[float]] = {}  # threads -> [images, seconds]
        self.last = time.perf_counter()
        self.batches = 0
        if self.active and key in _SPLITS:
            torch.set_num_threads(_SPLITS[key])
            self.active = False

    @property
    def threads(self) -> int:
        return int(self.torch.get_num_threads())

    def step(self, images: int, decode_cpu_s: float, now: float | None = None) -> None:
        """After each batch: its images and the CPU seconds its decoding took (``now``: the
        clock, for tests)."""
        now = time.perf_counter() if now is None else now
        wall, self.last = now - self.last, now
        self.batches += 1
        if not self.active or self.batches == 1 or images == 0:  # the first includes start-up
            return
        if not self.trial:
            if decode_cpu_s < self.DECODE_SHARE * wall:
                _SPLITS[self.key] = self.start  # decoding is cheap: every core computes
                self.active = False
                return
            self.trial = [self.start] * self.TRIAL + [self.start - 1] * self.TRIAL
            return
        rate = self.rates.setdefault(self.threads, [0.0, 0.0])
        rate[0] += images
        rate[1] += wall
        self.trial.pop(0)
        if self.trial:
            self.torch.set_num_threads(self.trial[0])
            return
        best = max(self.rates, key=lambda t: self.rates[t][0] / max(self.rates[t][1], 1e-9))
        _SPLITS[self.key] = best
        self.torch.set_num_threads(best)
        self.active = False

    def restore(self) -> None:
        self.torch.set_num_threads(self.start)


def decoded_on(device: str, loaded: Loaded, min_size: int | None = None) -> Loaded:
    """``loaded`` with its undecoded JPEGs decoded on ``device`` in one batched call (HWC
    uint8 tensors there); what no decoder can read becomes a recorded failure."""
    from pipeline.sources.decode import decode_on_device

    images, failures = decode_on_device(loaded.images, device, min_size)
    bad = {k for k, _ in failures}
    keep = [k for k in range(len(loaded.indices)) if k not in bad]
    return Loaded(indices=[loaded.indices[k] for k in keep], images=images,
                  failures=[*loaded.failures, *((loaded.indices[k], why) for k, why in failures)],
                  digests=[loaded.digests[k] for k in keep], cpu_seconds=loaded.cpu_seconds)
