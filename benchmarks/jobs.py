"""What the benchmarks share: run one job on a broker and wait for its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.client.api import submit
from pipeline.spec import JobSpec


def run_job(spec: JobSpec | dict[str, Any], broker: str,
            timeout: float = 7200) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit ``spec``, wait, and return (final status, report).

    Raises:
        SystemExit: the job did not succeed (its status and error).
    """
    job = submit(spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec), broker=broker)
    st = job.wait(timeout=timeout)
    if st["status"] != "SUCCESS":
        name = spec.name if isinstance(spec, JobSpec) else spec.get("name")
        raise SystemExit(f"{name}: {st['status']}: {st.get('error')}")
    return st, job.result()


def embeddings(job_dir: str | Path) -> np.ndarray:
    """An embed job's vectors as one array, row i = sample i."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(job_dir) / "embeddings.parquet")
    idx = np.asarray(table.column("index").to_pylist())
    x = np.zeros((len(idx), len(table.column("embedding")[0].as_py())), np.float32)
    x[idx] = np.asarray(table.column("embedding").to_pylist(), np.float32)
    return x
