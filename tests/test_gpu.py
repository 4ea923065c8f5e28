"""CUDA paths (bf16 autocast, channels_last, pinned uploads, batch size auto, fine-tuning):
run where a GPU is present (`pytest -m gpu`, benchmarks/gpu.sh); skipped with the reason
elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import submit
from pipeline.spec import FinetuneSpec
from tests.conftest import small_spec

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


def test_extraction_on_cuda_bf16_auto_batch(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = small_spec(tmp_path / "out").replace(backbone={
        "device": "cuda", "batch_size": "auto", "precision": "bf16", "image_size": 224})
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=600)
    assert st["status"] == "SUCCESS", st.get("error")
    shards = list(job.jobs.shard_results(job.id).values())
    assert shards
    for r in shards:
        assert r["device"] == "cuda" and r["precision"] == "torch.bfloat16"
        assert r["batch"] == 512


def test_finetune_on_cuda(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = small_spec(tmp_path / "out").replace(strategy="finetune", finetune=FinetuneSpec(
        epochs=2, batch_size=32, hflip=False, device="cuda"))
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=600)
    assert st["status"] == "SUCCESS", st.get("error")
    ft = job.result()["train"]["finetune"]
    assert ft["device"] == "cuda" and len(ft["history"]) == 2
