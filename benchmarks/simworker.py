"""Benchmark-only worker plugin: a simulated GPU. Workers started with ``--include
benchmarks.simworker`` run the real extraction task (plan reference checked, source opened
and decoded, shard written and recorded in Redis, progress, cancel checks) with the network
replaced by a sleep of ``SIM_SHARD_S`` seconds per shard (the modelled time of a real GPU
on a real shard) returning 8 zeros per image. Production code has no such switch.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery.signals import worker_init, worker_process_init

SHARD_S = float(os.environ.get("SIM_SHARD_S", "0.1") or 0)


class _SleepingNet:
    """Stands in for a backbone's forward: one sleep per call (one batch = one shard)."""

    def __call__(self, x: Any) -> Any:
        import torch

        time.sleep(SHARD_S)
        return torch.zeros(len(x), 8)

    def parameters(self) -> Any:
        return iter(())


def _patch() -> None:
    from pipeline import extract
    from pipeline.backbones import Backbone, resolve_weights

    def fake(name: str, weights: str | None, device: str, compile_: bool = False) -> Any:
        info = resolve_weights(name, weights)  # the planned identity (a file hash, no model)
        return Backbone(name=name, weights=info, model=_SleepingNet(), feature_dim=8)

    extract.cached_backbone = fake


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    _patch()  # thread pools run tasks in this process


@worker_process_init.connect
def _on_child_init(**_: Any) -> None:
    _patch()  # prefork children
