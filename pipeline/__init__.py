"""featurefleet: distributed transfer learning on Celery + Redis.

Public API::

    from pipeline import JobSpec, submit
    job = submit(JobSpec.from_file("job.yaml"))
    job.wait(timeout=600)
    print(job.result()["metrics"]["top1"])
"""

from pipeline.api import Job, get_job, submit
from pipeline.compare import compare
from pipeline.errors import FeaturefleetError
from pipeline.predict import load_classifier
from pipeline.spec import BackboneSpec, DataSpec, FinetuneSpec, JobSpec, ProbeSpec

__all__ = ["BackboneSpec", "DataSpec", "FeaturefleetError", "FinetuneSpec", "Job", "JobSpec",
           "ProbeSpec", "compare", "get_job", "load_classifier", "submit"]
