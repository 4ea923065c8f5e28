"""What torchrun runs in every rank: ``python -m pipeline.jobs.ranks <run file>``.

The run file (a :class:`~pipeline.jobs.training.RunFile`, written by the node task) holds the
plan reference, the time slice, the task's start and relaunch counts, the deadline. The plan
decides the program (:attr:`Plan.program`); this module only builds it: rank 0 reports
progress to the job record, checks for a cancel at most once a second, and writes the outcome
(done with its summary, continue, cancelled, or a rank's error) to the status file the node
task reads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.engine import dist
from pipeline.engine.launch import die_with_agent
from pipeline.engine.loop import Slice
from pipeline.errors import FeaturefleetError
from pipeline.fsio import atomic_write_text
from pipeline.jobs.broker import connect
from pipeline.jobs.records import JobStore
from pipeline.jobs.steps import plan_source as source_of
from pipeline.jobs.training import RunFile
from pipeline.plan import Plan, load_plan


def main(argv: list[str]) -> int:
    die_with_agent()  # no orphan rank outlives a killed torchrun to race its relaunch
    run = RunFile.model_validate_json(Path(argv[0]).read_text())
    plan = load_plan(run.ref)
    program = plan.program
    rank = dist.init(run.device)
    jobs = JobStore(connect(check=False, patient=True)) if rank.is_main else None
    checked = {"at": 0.0, "stop": False}

    def progress(p: dict[str, Any]) -> None:
        if jobs is not None:
            jobs.update(plan.job_id, **{str(program): {**p, "ranks": rank.world_size}})

    def should_stop() -> bool:
        if jobs is None:
            return False
        if time.monotonic() - checked["at"] > 1.0:
            checked["at"] = time.monotonic()
            checked["stop"] = jobs.field(plan.job_id, "status") == "CANCELLED"
        return bool(checked["stop"])

    how = Slice(out_dir=Path(run.out_dir), attempt=run.attempt, part=run.part,
                slice_s=run.slice_s, should_stop=should_stop, progress=progress,
                relaunch=run.relaunch, regroup=run.regroup)
    try:
        result = (_pretrain if program == "pretrain" else _finetune)(rank, plan, how)
    except FeaturefleetError as exc:  # the run's own error: no restart will mend it
        atomic_write_text(run.status_file, json.dumps({"state": "error", "error": str(exc)}))
        dist.finish()
        return 0
    if rank.is_main:
        state = "cancelled" if result.get("cancelled") else (
            "continue" if result.get("continue") else "done")
        atomic_write_text(run.status_file, json.dumps({"state": state, "summary": result}))
    dist.finish()
    return 0


def _pretrain(rank: dist.Rank, plan: Plan, how: Slice) -> dict[str, Any]:
    from pipeline.backbones import Preprocessing
    from pipeline.pretrain.train import Data, Encoder
    from pipeline.pretrain.train import run as pretrain

    s = plan.splits
    data = Data(source_of(plan), train=sorted(s.train + s.val), eval_train=list(s.train),
                eval_test=list(s.test))
    encoder = Encoder(arch=plan.backbone.name, weights=plan.backbone.weights,
                      pre=Preprocessing.from_dict(plan.backbone.preprocessing),
                      seed=plan.spec.data.seed)
    return pretrain(rank, data, plan.spec.pretrain, encoder, how)


def _finetune(rank: dist.Rank, plan: Plan, how: Slice) -> dict[str, Any]:
    from pipeline import finetune

    return finetune.run(rank, source_of(plan), plan.splits, plan.class_names, plan.backbone,
                        plan.spec.finetune, seed=plan.spec.data.seed, how=how,
                        splits_file=plan.job_dir / "splits.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
