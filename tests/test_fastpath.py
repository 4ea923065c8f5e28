"""Fast-path policies that do not need a GPU to check: out-of-memory halving, batch size
auto, precision choice, and torch.compile on a real backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import extract
from pipeline.errors import SpecError
from pipeline.spec import BackboneSpec, JobSpec


def test_out_of_memory_halves_the_batch_and_keeps_every_row() -> None:
    calls: list[int] = []
    weights = torch.arange(12, dtype=torch.float32).view(3, 4)

    def model(x: torch.Tensor) -> torch.Tensor:  # runs out of memory above 10 rows
        calls.append(len(x))
        if len(x) > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x @ weights

    x = torch.randn(40, 3)
    key = ("test-model", "cuda:0", 224)
    extract._FITS.pop(key, None)
    out = extract.forward_halving(model, x, key)
    torch.testing.assert_close(out, x @ weights)
    assert calls[:3] == [40, 20, 10] and extract._FITS[key] == 10
    calls.clear()
    extract.forward_halving(model, x[:25], key)  # later batches start at the size that fit
    assert calls == [10, 10, 5]


def test_other_errors_and_single_rows_are_not_retried() -> None:
    key = ("test-model-2", "cuda:0", 224)

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        extract.forward_halving(broken, torch.zeros(8, 3), key)

    def always_oom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")

    with pytest.raises(RuntimeError, match="can't allocate"):
        extract.forward_halving(always_oom, torch.zeros(8, 3), key)
    assert extract._FITS[key] == 1


def test_batch_size_auto_and_precision() -> None:
    auto = BackboneSpec(batch_size="auto")
    auto.validate()
    assert auto.batch_for("cuda:0") == 512 and auto.batch_for("cpu") == 32
    assert BackboneSpec(batch_size=64).batch_for("cuda") == 64
    spec = JobSpec.from_dict({"backbone": {"batch_size": "auto", "precision": "fp16",
                                           "compile": True}})
    assert spec.backbone.batch_size == "auto" and spec.backbone.compile is True
    with pytest.raises(SpecError, match=r"backbone.batch_size.*'big'.*auto"):
        JobSpec.from_dict({"backbone": {"batch_size": "big"}})
    with pytest.raises(SpecError, match=r"backbone.precision.*'int4'.*bf16"):
        JobSpec.from_dict({"backbone": {"precision": "int4"}})
    assert extract.autocast_dtype("cuda:0", "bf16") == torch.bfloat16
    assert extract.autocast_dtype("cuda", "fp16") == torch.float16
    assert extract.autocast_dtype("cuda", "fp32") is None
    assert extract.autocast_dtype("cpu", "bf16") is None


@pytest.mark.slow
def test_compiled_backbone_gives_the_same_features() -> None:
    eager = extract.cached_backbone("resnet18", "random", "cpu")
    compiled = extract.cached_backbone("resnet18", "random", "cpu", True)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    compiled.model._orig_mod.load_state_dict(eager.model.state_dict())
    with torch.inference_mode():
        a, b = eager.model(x), compiled.model(x)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)
    assert type(compiled.model).__name__ == "OptimizedModule"
