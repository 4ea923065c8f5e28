"""The sections of a job that look at data rather than train on it: the data-quality stage
(``quality``), batch prediction (``predict``), embeddings with their index (``embed``) and
recommendation from interactions plus item content (``recommend``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from pipeline.spec.fields import Float, Fraction01, Int, Section, Share, fix

QUALITY_EXCLUDE = ("leaks", "duplicates", "label_issues", "outliers")


class PredictSpec(Section):
    """Batch prediction (``kind: predict``): a trained classifier applied to every sample of
    ``data`` on the fleet. ``model``: a finished probe job's folder (``<output>/jobs/<id>``)
    or its id under this job's ``output``. The backbone and preprocessing are the model's
    (the job's ``backbone`` section is not used), so features already in the store for the
    same data are reused. ``head``: which of the job's heads (``primary``: the one it
    reported; a fine-tuning job's network is split once into its backbone, as a weights file,
    and its last layer). Predictions with a top probability below ``low_confidence`` are
    counted."""

    section: ClassVar[str] = "predict"
    model: str | None = Field(None, min_length=1, max_length=4096, json_schema_extra=fix(
        "name a finished job: its folder <output>/jobs/<id>, or its id"))
    head: Literal["primary", "linear", "mlp", "knn"] = "primary"
    top: Int = Field(3, ge=1, le=100, json_schema_extra=fix("use e.g. 3 (at most 100)"))
    low_confidence: Fraction01 = Field(0.5, json_schema_extra=fix("use e.g. 0.5"))


class EmbedSpec(Section):
    """Embeddings as a product (``kind: embed``): every sample's features exported to
    ``embeddings.parquet`` (id, label, vector) and a faiss index over the L2-normalised vectors
    (inner product = cosine). ``index: auto``: exact (flat) up to ``exact_up_to`` vectors,
    ``ivfsq8`` above (inverted lists of 8-bit scalar-quantised vectors: a quarter of the
    memory); ``ivfpq`` (product quantisation, 1/16 of it) where memory rules. An IVF index is
    trained on ``train_sample`` vectors, filled shard by shard, and its recall@10 against exact
    search is measured on ``recall_queries`` queries and reported."""

    section: ClassVar[str] = "embed"
    index: Literal["auto", "flat", "ivfsq8", "ivfpq"] = "auto"
    exact_up_to: Int = Field(200_000, ge=1, le=10**10, json_schema_extra=fix(
        "use e.g. 200000 vectors"))
    train_sample: Int = Field(50_000, ge=256, le=10**7, json_schema_extra=fix(
        "use e.g. 50000 (at least 256)"))
    nprobe: Int = Field(16, ge=1, le=65536, json_schema_extra=fix("use e.g. 16"))
    recall_queries: Int = Field(500, ge=10, le=100_000, json_schema_extra=fix(
        "use e.g. 500"))


class RecommendSpec(Section):
    """Recommendation (``kind: recommend``): ``data`` is the items (their text or images: any
    source; a table's ``items_id_column`` (default: ``item_column``) names each item, a
    folder's items are named by their path without the extension) and ``interactions`` a
    table of (user, item[, rating][, timestamp]) rows, CSV, JSONL or Parquet.

    Held out for evaluation: ``cold_fraction`` of the items with *every* interaction (cold
    start: only their content is known), and of each user's other interactions the last
    ``test_fraction`` by time (``split: time``; ``auto`` when there is a time column) or a
    random ``test_fraction`` (``split: random``). Models: random and popularity baselines,
    collaborative filtering (EASE, its penalty chosen from ``cf_l2`` on a validation part of
    training) for warm items, and for cold items content kNN (a user is the mean of their
    items' embeddings) and a ridge map from content embeddings to the collaborative item
    factors. Recall@K and NDCG@K per user, averaged over users, warm and cold apart."""

    section: ClassVar[str] = "recommend"
    interactions: str | None = Field(None, min_length=1, max_length=4096,
                                     json_schema_extra=fix(
        "name a CSV, JSONL or Parquet table with user and item columns"))
    user_column: str = Field("user", min_length=1, max_length=200, json_schema_extra=fix(
        "name the interactions' user column"))
    item_column: str = Field("item", min_length=1, max_length=200, json_schema_extra=fix(
        "name the interactions' item column"))
    items_id_column: str | None = Field(None, min_length=1, max_length=200,
                                        json_schema_extra=fix(
        "name the items table's id column, or leave it out (then item_column)"))
    time_column: str = Field("timestamp", min_length=1, max_length=200, json_schema_extra=fix(
        "name the interactions' time column (numbers or ISO dates)"))
    rating_column: str | None = Field(None, min_length=1, max_length=200,
                                      json_schema_extra=fix("name the rating column, or "
                                                            "leave it out"))
    min_rating: Float | None = Field(None, json_schema_extra=fix(
        "use e.g. 4 (interactions rated lower are not positives), or leave it out"))
    split: Literal["auto", "time", "random"] = "auto"
    test_fraction: Float = Field(0.2, gt=0, lt=1, json_schema_extra=fix("use e.g. 0.2"))
    cold_fraction: Float = Field(0.2, ge=0, lt=1, json_schema_extra=fix(
        "use e.g. 0.2 (0: no cold-item evaluation)"))
    ks: tuple[Int, ...] = Field((10, 20), min_length=1, max_length=5, json_schema_extra=fix(
        "use cut-offs such as [10, 20]"))
    cf_l2: tuple[Float, ...] = Field((30.0, 100.0, 300.0, 1000.0), min_length=1, max_length=12,
                                     json_schema_extra=fix("use penalties such as [100, 300]"))
    max_cf_items: Int = Field(20_000, ge=10, le=100_000, json_schema_extra=fix(
        "use e.g. 20000 (EASE holds an items x items matrix: 1.6 GB at 20k)"))
    max_interactions: Int = Field(20_000_000, ge=10, le=10**9, json_schema_extra=fix(
        "use e.g. 20000000, or sample the table"))


class QualitySpec(Section):
    """The data-quality stage of a probe job (and of ``featurefleet quality``), on the cached
    features: duplicates and leaks across splits, label issues (confident learning on
    out-of-fold probe predictions), outliers, a learning curve, and distribution shift.

    ``exclude`` trains and evaluates without what was found (the report shows test top-1 with
    and without). ``exclude_file``: samples a reviewer chose to leave out (the export of
    ``featurefleet quality JOB --export FILE``, edited, or one sample id per line), left out
    of every split at planning. ``near_duplicate_threshold``: the cosine similarity (of the
    features, the image signatures, the signatures aligned over small crops, or the images'
    fine detail aligned) above which
    two samples are near duplicates; by default calibrated per job and signal on perturbed
    copies of its own images (re-encoded, rescaled, cropped, brightened, noised).
    """

    section: ClassVar[str] = "quality"
    enabled: bool = True
    exclude: tuple[Literal["leaks", "duplicates", "label_issues", "outliers"], ...] = Field(
        (), max_length=4, json_schema_extra=fix(f"use some of {', '.join(QUALITY_EXCLUDE)}"))
    exclude_file: str | None = Field(None, min_length=1, max_length=4096, json_schema_extra=fix(
        "name a CSV with a sample_id column (featurefleet quality JOB --export FILE, "
        "reviewed) or a text file with one sample id per line"))
    near_duplicate_threshold: Float | None = Field(None, gt=0, le=1, json_schema_extra=fix(
        "use e.g. 0.97, or leave it out to calibrate it on the job's images"))
    neighbors: Int = Field(10, ge=2, le=100, json_schema_extra=fix("use e.g. 10"))
    block_rows: Int = Field(20_000, ge=100, le=10**7, json_schema_extra=fix(
        "use e.g. 20000 (rows per neighbour-search task: memory ~ rows x dim x 4 bytes)"))
    folds: Int = Field(5, ge=2, le=20, json_schema_extra=fix("use e.g. 5"))
    curve_fractions: tuple[Share, ...] = Field(
        (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0), min_length=1, max_length=20,
        json_schema_extra=fix("use fractions of the training set, e.g. [0.1, 0.5, 1.0]"))
    target_top1: tuple[Fraction01, ...] = Field(
        (0.9, 0.95, 0.99), max_length=10, json_schema_extra=fix(
            "use accuracies to ask 'how many labels per class reach it', e.g. [0.9, 0.95]"))
    outlier_z: Float = Field(3.5, gt=0, le=100, json_schema_extra=fix(
        "use e.g. 3.5 (robust z-score of the distance to the nearest neighbours)"))
    max_listed: Int = Field(50, ge=1, le=10_000, json_schema_extra=fix("use e.g. 50"))

    @field_validator("exclude", mode="before")
    @classmethod
    def _one(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value
