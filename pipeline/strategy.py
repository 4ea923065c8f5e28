"""``strategy: auto``: probe or fine-tune, chosen from data size, classes, compute and budget.

The usual guidance (Kornblith et al. 2019; Zhai et al. 2019, VTAB): with little data per class
or little compute, a classifier on frozen pretrained features is close to fine-tuning at a small
fraction of the cost; with enough data and a GPU, fine-tuning the whole network wins. The
decision and its reason are written into the plan and the report.
"""

from __future__ import annotations

from pipeline.spec import JobSpec

# Fine-tuning throughput (images/s at 224 px, forward + backward), used only for the estimate.
# CPU: EfficientNet-Lite0 on 2 cores measured 176 img/s at 64 px (~14 at 224); one GPU: a
# conservative figure for bf16 ResNet-50 / Lite0 training.
CPU_TRAIN_IMG_S_224 = 14.0
GPU_TRAIN_IMG_S_224 = 1000.0
# Text (``tokens`` instead of ``px``): all-MiniLM-L6-v2 at 128 tokens trained ~40 texts/s on
# the same 2 cores; a GPU, conservatively, 2000.
CPU_TRAIN_TEXT_S_128 = 40.0
GPU_TRAIN_TEXT_S_128 = 2000.0
MIN_IMAGES_PER_CLASS = 50  # below this, fine-tuning the whole network mostly overfits


def estimate_finetune_s(spec: JobSpec, n_train: int, crop: int, gpus: int,
                        unit: str = "px") -> float:
    """Rough seconds to fine-tune: epochs x (train + val pass) at the reference throughput
    (``crop``: the input size, in pixels or, with ``unit: tokens``, in tokens)."""
    if unit == "tokens":
        rate = GPU_TRAIN_TEXT_S_128 if gpus else CPU_TRAIN_TEXT_S_128
        cost = crop / 128
    else:
        rate = GPU_TRAIN_IMG_S_224 if gpus else CPU_TRAIN_IMG_S_224
        cost = (crop / 224) ** 2
    return spec.finetune.epochs * n_train * 1.1 * cost / rate


def choose(spec: JobSpec, n_train: int, n_classes: int, crop: int,
           gpus: int, unit: str = "px") -> tuple[str, str]:
    """(strategy, reason) for this job on a fleet with ``gpus`` GPU workers (``crop``: the
    input size in ``unit``, px or tokens)."""
    if spec.strategy != "auto":
        return spec.strategy, f"strategy {spec.strategy!r} was set in the spec"
    per_class = n_train / max(n_classes, 1)
    est = estimate_finetune_s(spec, n_train, crop, gpus, unit)
    what = "texts" if unit == "tokens" else "images"
    compute = f"{gpus} GPU worker(s)" if gpus else "CPU workers only (no GPU worker online)"
    budget = spec.time_budget_s
    facts = (f"{n_train} training {what}, {n_classes} classes (~{per_class:.0f} per class), "
             f"{compute}, fine-tuning estimated at ~{est:.0f} s for {spec.finetune.epochs} "
             f"epochs at {crop} {unit}")
    if per_class < MIN_IMAGES_PER_CLASS:
        return "probe", (f"probe: small data — {facts}; with fewer than "
                         f"{MIN_IMAGES_PER_CLASS} {what} per class fine-tuning the whole network "
                         "mostly overfits, a classifier on pretrained features is the usual choice")
    if budget is not None and est > budget:
        return "probe", (f"probe: {facts}, over the time budget of {budget:g} s; features + "
                         "classifier fit in it")
    if not gpus and budget is None:
        return "probe", (f"probe: little compute — {facts}; without a GPU the usual choice is "
                         "features + classifier (set time_budget_s to allow CPU fine-tuning "
                         "when the estimate fits)")
    within = f", within the time budget of {budget:g} s" if budget is not None else ""
    return "finetune", (f"finetune: {facts}{within}; with enough data and compute, fine-tuning "
                        "the whole network usually beats a linear probe")
