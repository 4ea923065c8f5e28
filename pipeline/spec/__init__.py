"""The job spec: one typed, frozen description of a job (``model``), validated once at the
boundary with one-line errors (``validation``)."""

from pipeline.spec.model import (
    AUTO_BATCH,
    AUTO_PRETRAIN_EPOCHS,
    AUTO_PRETRAIN_STEPS,
    DATA_SOURCES,
    HEADS,
    MAX_SPEC_BYTES,
    STRATEGIES,
    BackboneSpec,
    DataSpec,
    FinetuneSpec,
    JobSpec,
    PretrainSpec,
    ProbeSpec,
)
from pipeline.spec.sections import EmbedSpec, PredictSpec, QualitySpec, RecommendSpec

__all__ = ["AUTO_BATCH", "AUTO_PRETRAIN_EPOCHS", "AUTO_PRETRAIN_STEPS", "DATA_SOURCES", "HEADS",
           "MAX_SPEC_BYTES", "STRATEGIES",
           "BackboneSpec", "DataSpec", "EmbedSpec", "FinetuneSpec", "JobSpec", "PredictSpec",
           "PretrainSpec", "ProbeSpec", "QualitySpec", "RecommendSpec"]
