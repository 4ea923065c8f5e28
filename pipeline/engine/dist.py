"""Inside a rank: the process group, gathering across ranks, agreeing on a stop, and the
checkpoint every rank resumes from.

A single process (no torchrun) is a world of one: the same program runs unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fsio import atomic_path


@dataclass
class Rank:
    """This process's place in the world."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    restart: int = 0  # torchrun's restart count: > 0 after a rank failed and all restarted

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def split(self, batch: list[int]) -> list[int]:
        """This rank's share of a global batch (every rank gets the same number)."""
        per = len(batch) // self.world_size
        return batch[self.rank * per: (self.rank + 1) * per]

    def gather(self, x: Any) -> Any:
        """Every rank's ``x`` (same shape), concatenated in rank order; gradients flow back to
        each rank's own part (SimCLR sees the negatives of every rank, not just its own)."""
        if not self.distributed:
            return x
        import torch
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true on every rank when it is true on any (one all-reduce for all)."""
        if not self.distributed:
            return tuple(flags)
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v > 0) for v in t.tolist())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item() / self.world_size)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, model: Any) -> Any:
        """``model`` as DistributedDataParallel when there are several ranks."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)


def init(device: str = "auto") -> Rank:
    """Join the process group torchrun set up (``RANK``/``WORLD_SIZE``...), or a world of one.

    ``device``: ``auto`` takes this rank's GPU (``cuda:<local rank>``) when there is one.
    """
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, _local_world(world))))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():  # a peer lost mid-connect fails this rank in bounded time
            from datetime import timedelta

            from pipeline.settings import get_settings

            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    timeout=timedelta(seconds=get_settings().dist_timeout_s))
    return Rank(rank=rank, world_size=world, local_rank=local, device=device,
                restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def _local_world(world: int) -> int:
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE; featurefleet's launcher adds the
    nodes started here, for tests that run several nodes on one machine)."""
    return int(os.environ.get("FEATUREFLEET_RANKS_HERE", os.environ.get("LOCAL_WORLD_SIZE",
                                                                        world)))


def resume_reason(rank: Rank, attempt: int, part: int, relaunch: int = 0,
                  regroup: int = 0) -> str:
    """Why a run is resuming from its checkpoint (for the report)."""
    if regroup:
        return f"a node or rank was lost: every node regrouped (generation {regroup})"
    if rank.restart:
        return f"a rank failed: torchrun restarted every rank (restart {rank.restart})"
    if relaunch:
        return f"torchrun was lost: the node task started it again (relaunch {relaunch})"
    if attempt > 1:
        return "redelivered after its worker was lost"
    return "continued in a new task (time slice)" if part else "restarted"


def finish() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def save(rank: Rank, obj: Any, path: Path) -> None:
    """Rank 0 writes a checkpoint atomically; every rank waits for it."""
    if rank.is_main:
        import torch

        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    rank.barrier()


def load(path: Path) -> Any | None:
    """The checkpoint at ``path`` (safe load), or None."""
    if not path.is_file():
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
