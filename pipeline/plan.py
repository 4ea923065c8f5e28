"""The plan: the typed, validated spec plus every decision made for one job, made once.

A plan is built by :func:`pipeline.planner.make_plan` at submission and saved as
``<output>/jobs/<id>/plan.json``. It holds what every task needs to know and nothing they would
have to recompute: the strategy and its reason, the train/val/test sample ids (the one split),
the samples to extract and their shards, the backbone's weights and preprocessing (image size
resolved), the feature store's content key, and whether the probe sweeps λ (and its slices).

Celery messages carry a :class:`PlanRef` (job id, plan path, sha256), never the plan itself:
bulk data goes through shared storage, not through Redis. :func:`load_plan` checks a reference
before trusting it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from pipeline.errors import JobError, SpecError, short
from pipeline.fsio import atomic_path, atomic_write_text, is_remote
from pipeline.settings import ALLOWED_ROOTS_ENV, get_settings
from pipeline.spec import JobSpec

PLAN_SCHEMA = 1
JOB_ID = re.compile(r"^[0-9a-f]{12}$")
COMPARE_ID = re.compile(r"^cmp-[0-9a-f]{10}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Shard(_Frozen):
    """One extraction task's worth of samples: positions ``start:end`` in
    :attr:`Plan.extract_ids`."""

    start: int
    end: int
    path: str
    cached: bool = False

    @property
    def id(self) -> str:
        return f"{self.start}-{self.end}"

    @property
    def rows(self) -> int:
        return self.end - self.start


class Splits(_Frozen):
    """Sample indices (positions in the data source) of each split: sorted, disjoint."""

    train: list[int]
    val: list[int]
    test: list[int]

    def of(self, name: str) -> list[int]:
        if name not in ("train", "val", "test"):
            raise KeyError(name)
        return list(getattr(self, name))

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


class BackboneInfo(_Frozen):
    """The resolved backbone: weights identity and the preprocessing at the job's input size."""

    name: str
    weights: str | None
    weights_id: str
    weights_sha256: str
    preprocessing: dict[str, Any]
    feature_dtype: Literal["float16", "float32"] = "float16"
    precision: str = "bf16"


class Exclusion(_Frozen):
    """A sample left out of every split, and why (duplicate, conflicting labels...)."""

    index: int
    id: str
    reason: str
    kind: str = "duplicate"
    twin: int | None = None  # a duplicate's kept copy


class QualityPlan(_Frozen):
    """The data-quality stage's fan-out: neighbour-search blocks (positions in the sorted
    extracted ids), cross-validation folds, learning-curve fractions, the probe's penalty."""

    blocks: list[tuple[int, int]]
    folds: int
    fractions: list[float]
    l2: float
    # content address of the stage's result: the features (the shards' content key), the
    # split and the quality settings; ``cached``: a result for it is in the store (reused:
    # no part runs)
    key: str = ""
    cache_path: str = ""
    cached: bool = False

    def parts(self) -> list[str]:
        """The name of every part the stage records before it is summarized (none when the
        result is reused from the store)."""
        if self.cached:
            return []
        return ([f"neighbors.{i}" for i in range(len(self.blocks))]
                + [f"fold.{f}" for f in range(self.folds)]
                + [f"curve.{i}" for i in range(len(self.fractions))] + ["shift", "probe"])


class PredictPlan(_Frozen):
    """Batch prediction: the trained head applied to every extracted sample (checked by its
    sha256 before use), the classes it predicts, and what the output lists."""

    model_job: str  # the job that trained the head
    head: str  # heads registry name (linear, mlp, knn)
    head_path: str
    head_sha256: str
    class_names: list[str]
    top: int = 3
    low_confidence: float = 0.5


class Plan(_Frozen):
    """Everything the tasks of one job need to know."""

    schema_version: int = PLAN_SCHEMA
    job_id: str
    kind: Literal["classify", "pretrain", "quality", "predict", "embed",
                  "recommend"] = "classify"
    created: float  # when planned: a shard file older than this was not trusted then
    spec: JobSpec
    strategy: Literal["probe", "finetune"] = "probe"
    strategy_reason: str = ""
    fingerprint: str
    fingerprint_mode: Literal["content", "stat"] = "content"
    digests_sha256: str = ""  # of samples.npy: each sample's digest, checked by the workers
    class_names: list[str]
    n_samples: int
    splits: Splits
    excluded: list[Exclusion] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    backbone: BackboneInfo
    key: str
    shard_dir: str
    shards: list[Shard] = Field(default_factory=list)
    sweep: list[list[float]] | None = None  # slices of the λ grid; None: probe.l2 is fixed
    l2: float | None = None
    quality: QualityPlan | None = None  # None: no quality stage (off, or fine-tuning)
    predict: PredictPlan | None = None  # ``kind: predict``: the head applied to every sample
    _digests: np.ndarray | None = PrivateAttr(default=None)

    def with_digests(self, digests: np.ndarray) -> Plan:
        """This plan holding every sample's digest (saved as ``samples.npy``)."""
        plan = self.model_copy(update={"digests_sha256": array_sha256(digests)})
        plan._digests = digests
        return plan

    def digests(self) -> np.ndarray:
        """Every sample's digest, as planned (read from ``samples.npy`` and checked).

        Raises:
            JobError: the file is missing or not the planned one.
        """
        if self._digests is None:
            self._digests = _read_digests(str(self.job_dir / "samples.npy"),
                                          self.digests_sha256)
        return self._digests

    @property
    def job_dir(self) -> Path:
        return Path(self.spec.output) / "jobs" / self.job_id

    @property
    def program(self) -> Literal["pretrain", "finetune"] | None:
        """The one decision of which training program the job runs on the engine (None: a
        probe or quality job, which trains heads on features)."""
        if self.kind == "pretrain":
            return "pretrain"
        return "finetune" if self.strategy == "finetune" and self.kind == "classify" else None

    @property
    def training(self) -> Any:
        """The spec section of the job's training program (``pretrain`` or ``finetune``).

        Raises:
            JobError: the job runs no training program.
        """
        if self.program is None:
            raise JobError(f"job {self.job_id} runs no training program (strategy "
                           f"{self.strategy}, kind {self.kind})")
        return self.spec.pretrain if self.program == "pretrain" else self.spec.finetune

    @property
    def path(self) -> Path:
        return self.job_dir / "plan.json"

    @property
    def extract_ids(self) -> list[int]:
        """The samples whose features are extracted (every split), in shard order."""
        return sorted({*self.splits.train, *self.splits.val, *self.splits.test})

    def shard(self, shard_id: str) -> Shard:
        """The plan's shard with this id (a message naming another is refused).

        Raises:
            JobError: no such shard in the plan.
        """
        for s in self.shards:
            if s.id == shard_id:
                return s
        raise JobError(f"job {self.job_id} has no shard {short(shard_id)}; fix: send only "
                       "shards of the job's plan")

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self) -> PlanRef:
        """Write ``plan.json`` (atomically) and ``spec.json``; return the reference tasks carry."""
        text = self.to_json()
        if self._digests is not None:
            with atomic_path(self.job_dir / "samples.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, self._digests, allow_pickle=False)
        atomic_write_text(self.path, text)
        atomic_write_text(self.job_dir / "spec.json", json.dumps(self.spec.to_dict(), indent=2))
        return PlanRef(job_id=self.job_id, path=str(self.path), sha256=_sha(text))


PlanMessage = dict[str, str]  # a PlanRef as a Celery message carries it (checked by load_plan)


class PlanRef(_Frozen):
    """What a Celery message carries instead of the plan: small, and checked on arrival."""

    job_id: str
    path: str
    sha256: str

    def to_message(self) -> PlanMessage:
        return {"job_id": self.job_id, "path": self.path, "sha256": self.sha256}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@functools.lru_cache(maxsize=8)
def _read_digests(path: str, sha256: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise JobError(f"the job's sample digests {path!r} are unreadable ({exc}); fix: submit "
                       "the job again") from None
    if array_sha256(array) != sha256:
        raise JobError(f"the job's sample digests {path!r} changed since planning; fix: submit "
                       "the job again")
    return np.asarray(array)


def check_job_id(job_id: Any) -> str:
    """A job id is an id (12 hex digits), never a path.

    Raises:
        JobError: anything else.
    """
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise JobError(f"{short(job_id)} is not a job id (12 hex digits); fix: use the id that "
                       "featurefleet submit printed")
    return job_id


def load_plan(ref: Any) -> Plan:
    """The plan a message refers to, after checking the reference: a real job id, the plan file
    of that job, inside the allowed roots, with the sha256 the sender saw, whose every path is
    inside the allowed roots too.

    Raises:
        JobError: a malformed reference, a missing or changed plan file.
        SpecError: a path outside $FEATUREFLEET_ALLOWED_ROOTS.
    """
    if not isinstance(ref, dict) or set(ref) != {"job_id", "path", "sha256"}:
        raise JobError(f"malformed plan reference {short(ref)}; fix: send tasks built by "
                       "workers.canvas")
    job_id = check_job_id(ref["job_id"])
    path = Path(str(ref["path"]))
    if not path.is_absolute() or path.parts[-3:] != ("jobs", job_id, "plan.json") \
            or ".." in path.parts:
        raise JobError(f"plan path {short(str(path))} is not <output>/jobs/{job_id}/plan.json; "
                       "fix: send tasks built by workers.canvas")
    check_paths([("plan", str(path))])
    try:
        text = path.read_text()
    except OSError as exc:
        raise JobError(f"job {job_id}: plan {str(path)!r} is unreadable ({exc.strerror}); fix: "
                       "workers need the job's output folder on shared storage") from None
    if _sha(text) != ref["sha256"]:
        raise JobError(f"job {job_id}: plan {str(path)!r} changed since the job was submitted; "
                       "fix: submit the job again")
    plan = _checked(text, str(ref["sha256"]), get_settings().allowed_roots)
    if plan.job_id != job_id:
        raise JobError(f"plan {str(path)!r} belongs to job {plan.job_id}, not {job_id}")
    return plan


_CHECKED: dict[tuple[str, str], Plan] = {}  # (sha256, allowed roots) -> parsed, checked plan
_CHECKED_MAX = 32


def _checked(text: str, sha256: str, roots: str) -> Plan:
    """The parsed plan, its paths checked against the allowed roots: once per plan and
    worker process (every task of a 10,000-shard job would otherwise parse a 1.5 MB plan and
    check 10,000 paths: tens of milliseconds a task). Keyed by the verified sha256."""
    key = (sha256, roots)
    plan = _CHECKED.get(key)
    if plan is None:
        plan = Plan.model_validate_json(text)
        check_plan(plan, message_size=False)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.pop(next(iter(_CHECKED)))
        _CHECKED[key] = plan
    return plan


def read_plan(job_dir: str | Path) -> Plan:
    """A job's plan from its folder (client side: retry, recovery, the watchdog).

    Raises:
        JobError: no plan there, or not a readable featurefleet plan.
    """
    path = Path(job_dir) / "plan.json"
    try:
        return Plan.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise JobError(f"no readable plan at {str(path)!r} ({exc.strerror}); fix: pass the "
                       "job's folder (<output>/jobs/<id>)") from None
    except ValueError as exc:  # pydantic's ValidationError: broken JSON, a changed schema
        raise JobError(f"{str(path)!r} is not a featurefleet plan ({short(str(exc), 120)}); "
                       "fix: pass the folder of a job planned by this version of featurefleet "
                       "(<output>/jobs/<id>), or submit its spec again") from None


def read_spec(job_dir: str | Path) -> JobSpec:
    """A job's spec from its folder (``spec.json``).

    Raises:
        JobError: missing or not a spec.
    """
    path = Path(job_dir) / "spec.json"
    try:
        return JobSpec.from_dict(json.loads(path.read_bytes()))
    except OSError as exc:
        raise JobError(f"no readable spec at {str(path)!r} ({exc.strerror}); fix: submit the "
                       "job's YAML again") from None
    except (ValueError, SpecError) as exc:
        raise JobError(f"{str(path)!r} is not a job spec ({short(str(exc), 120)}); fix: "
                       "submit the job's YAML again") from None


def check_paths(targets: list[tuple[str, str]]) -> None:
    """Refuse paths outside $FEATUREFLEET_ALLOWED_ROOTS (when it is set).

    Raises:
        SpecError: naming the path, the roots and the variable.
    """
    settings = get_settings()
    raw_roots = settings.roots
    if not raw_roots:
        return
    roots = settings.local_roots()
    for name, path in targets:
        if is_remote(path):  # a URL must start with an allowed URL prefix
            if not any(str(path).startswith(str(r).rstrip("/") + "/") for r in raw_roots):
                raise SpecError(name, f"{short(str(path))} is outside the allowed roots "
                                f"{raw_roots}", f"write under one of them (set by "
                                f"{ALLOWED_ROOTS_ENV})")
            continue
        p = Path(path).expanduser().resolve()
        if not any(p == r or p.is_relative_to(r) for r in roots):
            raise SpecError(name, f"{short(str(path))} is outside the allowed roots "
                            f"{[str(r) for r in roots]}", f"write under one of them (set by "
                            f"{ALLOWED_ROOTS_ENV})")


def check_plan(plan: Plan, message_size: bool = True) -> None:
    """Every path the plan writes to inside the allowed roots; with ``message_size``, a plan
    small enough for shared storage to hand out quickly.

    Raises:
        SpecError: a path outside the allowed roots, or an oversized plan.
    """
    targets = [("output", plan.spec.output), ("store", plan.spec.store_dir),
               ("store", plan.shard_dir)]
    targets += [("store", s.path) for s in plan.shards]
    if plan.predict is not None:  # read by a worker: inside the roots too
        targets.append(("predict.model", plan.predict.head_path))
    check_paths(targets)
    if message_size:
        size = len(plan.to_json())
        if size > MAX_PLAN_BYTES:
            raise SpecError("data.shard_size", f"the job's plan is {size} bytes for "
                            f"{len(plan.shards)} shards, over {MAX_PLAN_BYTES} bytes",
                            "raise data.shard_size so fewer shards are needed")


MAX_PLAN_BYTES = 256 << 20  # plans live on shared storage; this only stops absurd ones
