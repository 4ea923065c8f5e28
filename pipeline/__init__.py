"""featurefleet: distributed transfer learning on Celery + Redis.

Public API::

    from pipeline import JobSpec, submit
    job = submit(JobSpec.from_file("job.yaml"))
    job.wait(timeout=600)
    print(job.result()["metrics"]["top1"])

The names below are loaded on first use, so importing a stage module (as workers do) does not
load the client layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.client.api import Job, get_job, submit
    from pipeline.client.compare import compare
    from pipeline.errors import FeaturefleetError
    from pipeline.predict import load_classifier
    from pipeline.spec import BackboneSpec, DataSpec, FinetuneSpec, JobSpec, ProbeSpec

_WHERE = {"Job": "pipeline.client.api", "get_job": "pipeline.client.api",
          "submit": "pipeline.client.api", "compare": "pipeline.client.compare",
          "FeaturefleetError": "pipeline.errors", "load_classifier": "pipeline.predict",
          "BackboneSpec": "pipeline.spec", "DataSpec": "pipeline.spec",
          "FinetuneSpec": "pipeline.spec", "JobSpec": "pipeline.spec",
          "ProbeSpec": "pipeline.spec"}

__all__ = ["BackboneSpec", "DataSpec", "FeaturefleetError", "FinetuneSpec", "Job", "JobSpec",
           "ProbeSpec", "compare", "get_job", "load_classifier", "submit"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
