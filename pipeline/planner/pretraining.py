"""What the planner decides for a pretraining job: whether the data and the networks can
pretrain (checked before anything is enqueued), and the recipe: the epochs ``auto`` resolves
to and the plan's sentence saying what trains, from what, for how long and why."""

from __future__ import annotations

from pipeline import backbones
from pipeline.errors import DataError
from pipeline.sources import Source
from pipeline.spec import AUTO_PRETRAIN_EPOCHS, AUTO_PRETRAIN_STEPS, JobSpec


def pretrain_recipe(spec: JobSpec, weights_id: str, samples: int) -> tuple[JobSpec, str]:
    """The pretraining job's spec with ``epochs: auto`` resolved from the data size
    (:meth:`PretrainSpec.epochs_for`), and the plan's sentence saying what will train, from
    what, for how long and why."""
    cfg = spec.pretrain
    steps = max(1, samples // cfg.batch_size)
    if cfg.epochs == "auto":
        lo, hi = AUTO_PRETRAIN_EPOCHS
        epochs = cfg.epochs_for(samples)
        why = (f"{epochs} epochs (auto: about {AUTO_PRETRAIN_STEPS:,} optimizer steps of "
               f"{cfg.batch_size} images over {samples:,} images, {steps:,} per epoch, kept "
               f"within {lo}-{hi} epochs; set pretrain.epochs to choose)")
        spec = spec.replace(pretrain={"epochs": epochs})
    else:
        why = f"{cfg.epochs} epochs ({steps * cfg.epochs:,} optimizer steps)"
    start = (f"continued from {weights_id} at learning rate {cfg.lr:g}"
             if weights_id != backbones.RANDOM else "from random initialisation")
    return spec, (f"pretraining ({cfg.method}): the encoder is trained on the images, labels "
                  f"unused; {start}; {why}")


def pretrain_checks(source: Source, spec: JobSpec, crop: int, samples: int) -> None:
    """What pretraining needs from the data and the networks, checked before enqueueing
    (``samples``: how many the encoder trains on, after the limit and exclusions).

    Raises:
        DataError: too few images, or images too small for random crops.
        SpecError: an autoencoder whose decoder cannot reach the input size.
    """
    from pipeline.pretrain.models import decoder_plan

    cfg = spec.pretrain
    if cfg.method == "autoencoder":
        decoder_plan(crop)
    if samples < cfg.batch_size:
        raise DataError(f"{samples} images to pretrain on are fewer than one batch "
                        f"(pretrain.batch_size {cfg.batch_size}); fix: add images, raise "
                        "data.limit, or lower pretrain.batch_size")
    probe = source.load(list(range(min(16, len(source)))))
    sides = [min(im.shape[:2]) for im in probe.images]
    if sides and min(sides) < cfg.min_image_side:
        raise DataError(f"images are as small as {min(sides)} px (e.g. "
                        f"{source.sample_id(probe.indices[sides.index(min(sides))])!r}), too "
                        f"small for random crops (pretrain.min_image_side {cfg.min_image_side})"
                        "; fix: use larger images, or lower pretrain.min_image_side")
