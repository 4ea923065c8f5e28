"""The engine's resumable data-parallel training loop: the one loop every program runs in.

A program (fine-tuning, pretraining, and whatever trains next) supplies its network, its
optimizer and ``step(batch) -> loss``, plus ``evaluate(epoch)`` and a JSON-able ``extra``
state; the loop owns everything else, the same way for all of them:

- **seeded global batches**: each epoch's order is a permutation seeded by ``(seed, epoch)``,
  cut into global batches of ``batch_size``; every rank trains on its ``rank.split`` share;
- **the schedule**: linear warm-up then cosine to 0, one ``LambdaLR`` stepped once per batch;
- **resume to the exact batch**: ``last.pt`` holds the model, optimizer, scheduler and one
  state record (epoch, step, global step, the running epoch's loss/samples/seconds, history,
  resumes, the program's ``extra``); a resumed run skips exactly the batches already done and
  draws the same augmentation (the generator is reseeded from ``(seed, rank, global step)`` at
  every step), so a resumed epoch's record is the uninterrupted one's;
- **time slices and stop**: after ``slice_s`` seconds, or when ``should_stop()`` turns true on
  any rank, every rank agrees (one all-reduce a step, with the "empty batch" flag), checkpoints
  and returns ``Outcome("continue")`` / ``Outcome("cancelled")``; the last step of an epoch
  first finishes the epoch (its record and checkpoint), never leaving an empty epoch behind;
- **unreadable samples**: a batch is filled up to the rank's share by repeating its readable
  samples (every rank contributes the same number); a step where some rank read nothing is
  skipped by every rank (DDP needs every rank in every step) and counted; an epoch in which
  nothing was readable is a :class:`~pipeline.errors.JobError`;
- **checkpoint cadence**: every epoch and every ``checkpoint_every_steps``; **progress** at
  most once a second on rank 0; **the per-epoch record** (loss, samples, images/s, learning
  rates, plus what ``evaluate`` returns on rank 0).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.engine.dist import Rank, load, resume_reason, save
from pipeline.errors import JobError

CHECKPOINT_SCHEMA = 2
Progress = Callable[[dict[str, Any]], None]


class Decoded(Protocol):
    """A decoded batch (``pipeline.sources.Loaded``): samples read, their indices, failures."""

    images: list[Any]
    indices: list[int]
    failures: list[tuple[int, str]]


Feed = Callable[[list[int], int], Iterable[Decoded]]  # (sample indices, batch size) -> batches


@dataclass(frozen=True)
class Batch:
    """One rank's share of a global batch, as the program's ``step`` gets it."""

    samples: list[Any]  # decoded images or texts (readable ones repeated to fill the share)
    indices: np.ndarray  # the sample index of each
    epoch: int
    step: int  # in the epoch, from 0
    generator: Any  # torch.Generator, seeded from (seed, rank, global step)


class Program(Protocol):
    """What a training program supplies to the loop."""

    net: Any  # the module whose weights are checkpointed (not DDP-wrapped)
    optimizer: Any
    extra: dict[str, Any]  # JSON-able program state kept in the checkpoint

    def step(self, batch: Batch) -> Any:
        """Forward pass on ``batch``: the loss tensor (the loop runs backward and the step)."""
        ...

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """On rank 0 after each epoch: numbers for the epoch's record (may be empty)."""
        ...

    # optional: ``after_step(global_step, total_steps)`` after each optimizer step (e.g. a
    # momentum target's update); called on every rank


@dataclass(frozen=True)
class LoopConfig:
    """The loop's settings (from the program's spec section)."""

    epochs: int
    batch_size: int  # global: split across the ranks
    seed: int
    warmup_fraction: float = 0.1
    checkpoint_every_steps: int = 0  # 0: every epoch only
    bf16: bool = False  # autocast on CUDA
    batch_field: str = "batch_size"  # the spec field named when the batch does not fit


@dataclass
class Slice:
    """How this run of the loop was started: where it checkpoints, which task start, which
    time slice, how long it may train, how to know it was cancelled, where progress goes."""

    out_dir: Path
    attempt: int = 1  # starts of this slice's task (> 1: delivered again)
    part: int = 0  # time slice
    relaunch: int = 0  # times the node task started torchrun again after losing it
    regroup: int = 0  # the multi-node meeting's generation (> 0: the nodes met again)
    slice_s: float | None = None
    should_stop: Callable[[], bool] = lambda: False
    progress: Progress | None = None


@dataclass
class Outcome:
    """How the loop ended: ``done`` (all epochs), ``continue`` (slice over), ``cancelled``."""

    state: Literal["done", "continue", "cancelled"]
    record: dict[str, Any] = field(default_factory=dict)  # the loop's state record
    steps_per_epoch: int = 0

    @property
    def done(self) -> bool:
        return self.state == "done"


def schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The augmentation seed of one rank's step (resumed runs draw the same views)."""
    return int(np.random.SeedSequence([seed, rank, global_step]).generate_state(1)[0])


def epoch_batches(train: Sequence[int], seed: int, epoch: int, global_batch: int,
                  steps: int) -> list[np.ndarray]:
    """Epoch ``epoch``'s global batches: a permutation seeded by (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(train, np.int64))
    return [order[b * global_batch:(b + 1) * global_batch] for b in range(steps)]


def fill(loaded: Decoded, n: int) -> tuple[list[Any], np.ndarray]:
    """``n`` samples from a batch whose unreadable ones were dropped, readable ones repeated
    (every rank must contribute the same number); empty when nothing was readable."""
    if not loaded.images:
        return [], np.zeros(0, np.int64)
    k = len(loaded.images)
    pick = [i % k for i in range(max(n, k))]
    return ([loaded.images[i] for i in pick],
            np.asarray([loaded.indices[i] for i in pick], np.int64))


def _new_record() -> dict[str, Any]:
    return {"epoch": 0, "step": 0, "global_step": 0, "history": [], "resumes": [],
            "train_seconds": 0.0, "images": 0, "skipped": [], "skipped_count": 0,
            "empty_steps": 0, "running": {"loss": 0.0, "seen": 0, "seconds": 0.0}}


def run(rank: Rank, program: Program, train: Sequence[int], cfg: LoopConfig, how: Slice,
        feed: Feed, sample_id: Callable[[int], str] = str) -> Outcome:
    """Train ``program`` on the ``train`` sample indices until the epochs are done, the slice
    is over or the job is cancelled; resume from ``how.out_dir/last.pt`` when present.

    Raises:
        JobError: the batch does not fit the data or the ranks; nothing readable in an epoch.
    """
    import torch

    per_rank = cfg.batch_size // rank.world_size
    steps = len(train) // max(1, per_rank * rank.world_size)
    if steps == 0 or per_rank < 2:
        raise JobError(f"{len(train)} training samples are fewer than {cfg.batch_field} "
                       f"{cfg.batch_size}, or the batch leaves fewer than 2 per rank over "
                       f"{rank.world_size} ranks; fix: lower {cfg.batch_field} or the nodes")
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        program.optimizer, schedule(total, max(1, round(cfg.warmup_fraction * total))))
    last_path = how.out_dir / "last.pt"
    rec = _new_record()
    ckpt = load(last_path)
    if ckpt is not None and ckpt.get("schema") != CHECKPOINT_SCHEMA:
        ckpt = None  # written by an older featurefleet: its state record differs; start over
    if ckpt is not None:
        program.net.load_state_dict(ckpt["model"])
        program.optimizer.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        rec = json.loads(ckpt["state"])
        program.extra = rec.pop("program", program.extra)
        rec["resumes"].append({"reason": resume_reason(rank, how.attempt, how.part,
                                                       how.relaunch, how.regroup),
                               "attempt": how.attempt, "restart": rank.restart,
                               "relaunch": how.relaunch, "regroup": how.regroup,
                               "part": how.part, "epoch": rec["epoch"], "step": rec["step"],
                               "global_step": rec["global_step"], "at": time.time()})

    def checkpoint() -> None:
        save(rank, {"schema": CHECKPOINT_SCHEMA, "model": program.net.state_dict(),
                    "optimizer": program.optimizer.state_dict(),
                    "scheduler": sched.state_dict(),
                    "state": json.dumps({**rec, "program": program.extra})}, last_path)

    def stopped() -> Outcome:
        return Outcome("cancelled" if how.should_stop() else "continue", rec, steps)

    amp = cfg.bf16 and rank.device.startswith("cuda")
    gen = torch.Generator()
    deadline = None if how.slice_s is None else time.time() + how.slice_s
    reported = 0.0
    model = getattr(program, "model", program.net)
    after_step = getattr(program, "after_step", None)
    while rec["epoch"] < cfg.epochs:
        epoch = rec["epoch"]
        batches = epoch_batches(train, cfg.seed, epoch, per_rank * rank.world_size, steps)
        mine = [int(i) for b in batches[rec["step"]:] for i in rank.split(list(b))]
        run_ = rec["running"]
        model.train()
        t0 = time.perf_counter()
        for loaded in feed(mine, per_rank):
            if loaded.failures:
                rec["skipped_count"] += len(loaded.failures)
                rec["skipped"].extend(sample_id(i) for i, _ in loaded.failures
                                      if len(rec["skipped"]) < 100)
            samples, indices = fill(loaded, per_rank)
            late = deadline is not None and time.time() > deadline
            stop, empty = rank.agree(late or how.should_stop(), not samples)
            if empty:  # some rank read nothing: every rank skips this step together
                rec["empty_steps"] += 1
                program.optimizer.zero_grad(set_to_none=True)  # (the schedule still moves on)
            else:
                gen.manual_seed(step_seed(cfg.seed, rank.rank, rec["global_step"]))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    loss = program.step(Batch(samples, indices, epoch, rec["step"], gen))
                program.optimizer.zero_grad(set_to_none=True)
                loss.float().backward()
                program.optimizer.step()
                if after_step is not None:
                    after_step(rec["global_step"], total)
                run_["loss"] += float(loss.detach()) * len(samples)
                run_["seen"] += len(samples)
                rec["images"] += len(samples) * rank.world_size
            with warnings.catch_warnings():  # an empty step moves the schedule, not the weights
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            rec["step"] += 1
            rec["global_step"] += 1
            now = time.perf_counter()
            run_["seconds"] += now - t0
            rec["train_seconds"] += now - t0
            t0 = now
            last_step = rec["step"] == steps
            if how.progress is not None and rank.is_main and (now - reported > 1.0 or last_step):
                reported = now
                how.progress(_progress(rec, cfg, steps, rank))
            if not last_step and (stop or (cfg.checkpoint_every_steps
                                           and rec["step"] % cfg.checkpoint_every_steps == 0)):
                checkpoint()
                if stop:
                    return stopped()
        if rank.mean(float(run_["seen"])) == 0:
            raise JobError(f"no readable sample in epoch {epoch + 1} ({steps} batches); fix: "
                           "check the data (featurefleet quality) or the skipped samples")
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": round(rank.mean(run_["loss"] / max(run_["seen"], 1)), 5),
            "images": run_["seen"] * rank.world_size,
            "images_per_s": round(run_["seen"] * rank.world_size / run_["seconds"], 2)
            if run_["seconds"] else None,
            "lr": [round(g["lr"], 8) for g in program.optimizer.param_groups]}
        if rank.is_main:  # the others wait at the checkpoint's barrier
            row.update(program.evaluate(epoch))
        rec["history"].append(row)
        rec["epoch"], rec["step"] = epoch + 1, 0
        rec["running"] = {"loss": 0.0, "seen": 0, "seconds": 0.0}
        checkpoint()
        if rec["epoch"] < cfg.epochs:
            late = deadline is not None and time.time() > deadline
            if rank.agree(late or how.should_stop())[0]:
                return stopped()
    return Outcome("done", rec, steps)


def _progress(rec: dict[str, Any], cfg: LoopConfig, steps: int, rank: Rank) -> dict[str, Any]:
    run_ = rec["running"]
    last = rec["history"][-1] if rec["history"] else {}
    return {"epoch": rec["epoch"] + 1, "epochs": cfg.epochs, "step": rec["step"],
            "steps": steps, "loss": round(run_["loss"] / max(run_["seen"], 1), 5),
            "images_per_s": round(run_["seen"] * rank.world_size / max(run_["seconds"], 1e-6),
                                  1),
            **{k: v for k, v in last.items() if k.endswith("_top1")}}


def summary(out: Outcome, rank: Rank) -> dict[str, Any]:
    """The loop's part of a finished run's summary (history, resumes, time, steps)."""
    rec = out.record
    return {"history": rec["history"], "resumes": rec["resumes"],
            "seconds": round(rec["train_seconds"], 3), "images": rec["images"],
            "global_step": rec["global_step"], "steps_per_epoch": out.steps_per_epoch,
            "world_size": rank.world_size, "device": rank.device,
            "skipped_train": rec["skipped"], "skipped_train_count": rec["skipped_count"],
            "empty_steps": rec["empty_steps"]}
