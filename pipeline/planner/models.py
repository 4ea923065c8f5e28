"""``kind: predict``: the trained classifier a prediction job applies, resolved at planning
(a probe job's head, or a fine-tuning job's network split once into a backbone weights file
and its last layer)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import BackboneError, SpecError
from pipeline.plan import JOB_ID, PredictPlan, read_plan
from pipeline.spec import JobSpec


def resolve_model(spec: JobSpec) -> tuple[JobSpec, PredictPlan]:
    """``kind: predict``: the trained classifier ``predict.model`` names, and the spec with
    the model's backbone section (its backbone, weights, input size, decoding, precision: so
    the features match what the head was trained on, and stored ones are reused).

    Raises:
        SpecError: no model named, not a finished probe job, or its head file is missing.
    """
    from pipeline.backbones import sha256_of
    from pipeline.errors import JobError

    given = spec.predict.model
    if not given:
        raise SpecError("predict.model", "is not set (kind: predict applies a trained "
                        "classifier)", "name a finished job: predict.model: <output>/jobs/<id>"
                        " or its id")
    folder = Path(given).expanduser()
    if not folder.is_dir() and JOB_ID.match(given):
        folder = Path(spec.output).expanduser().resolve() / "jobs" / given
    if not folder.is_dir():
        raise SpecError("predict.model", f"{given!r} is neither a job folder nor the id of a "
                        f"job under {spec.output!r}", "pass <output>/jobs/<id> of a finished "
                        "classification job")
    try:
        trained = read_plan(folder)
    except JobError as exc:
        raise SpecError("predict.model", f"{given!r} holds no job plan ({exc})",
                        "pass the folder of a finished classification job") from None
    if trained.kind != "classify":
        raise SpecError("predict.model", f"job {trained.job_id} is a {trained.kind} job; "
                        "batch prediction applies a trained classifier",
                        "name a classification job (strategy probe or finetune)")
    backbone = trained.spec.backbone
    if backbone.name.startswith("job:"):  # an encoder pretrained by another job: its file
        backbone = backbone.replace(name=trained.backbone.name,
                                    weights=trained.backbone.weights)
    if trained.strategy == "finetune":  # its backbone + last layer, split once
        head, name = _finetuned_head(folder, trained.job_id), "finetuned"
        from pipeline.heads import load_head

        backbone = backbone.replace(name=trained.backbone.name,
                                    weights=str(load_head(head).meta["weights"]))
    else:
        heads = list(trained.spec.probe.heads)
        name = heads[0] if spec.predict.head == "primary" else spec.predict.head
        if name not in heads:
            raise SpecError("predict.head", f"job {trained.job_id} trained no {name!r} head "
                            f"(it has {', '.join(heads)})", f"use one of {', '.join(heads)}, "
                            "or primary")
        head = folder / ("head.pt" if name == heads[0] else f"head-{name}.pt")
    if not head.is_file():
        raise SpecError("predict.model", f"job {trained.job_id} has no {head.name} (not "
                        "finished, or failed)", f"wait for it: featurefleet watch "
                        f"{trained.job_id}")
    model = PredictPlan(model_job=trained.job_id, head=name, head_path=str(head.resolve()),
                        head_sha256=sha256_of(head), class_names=trained.class_names,
                        top=min(spec.predict.top, len(trained.class_names)),
                        low_confidence=spec.predict.low_confidence)
    return spec.replace(backbone=backbone.model_dump(mode="json"), strategy="probe"), model


def _finetuned_head(folder: Path, job_id: str) -> Path:
    """A fine-tuning job's network as a backbone weights file + a linear head (exported once).

    Raises:
        SpecError: not finished, or a network that cannot be split (a text encoder).
    """
    from pipeline.finetune import export_for_features

    best = folder / "finetune" / "best.pt"
    if not (folder / "report.json").is_file() or not best.is_file():
        raise SpecError("predict.model", f"fine-tuning job {job_id} has not finished",
                        f"wait for it: featurefleet watch {job_id}")
    try:
        return export_for_features(best)
    except BackboneError as exc:
        raise SpecError("predict.model", str(exc).split("; fix: ")[0],
                        str(exc).split("; fix: ")[-1]) from None
