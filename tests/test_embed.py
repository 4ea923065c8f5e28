"""Embeddings as a product (``kind: embed``): the export (Parquet rows aligned with the faiss
index, exact and IVF-PQ indexes, recall against exact search measured), search by id, vector
and new samples, bad queries, and a whole job through real worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import FeaturefleetError
from pipeline.spec import EmbedSpec, JobSpec


def _shards(tmp_path: Path, n: int, dim: int, per: int = 700) -> list[str]:
    """Real HDF5 shards of clustered random vectors (16 clusters: a known neighbourhood)."""
    from pipeline.store.shards import ShardData, write_shard

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, dim)).astype(np.float32)
    labels = rng.integers(0, 16, n)
    x = centres[labels] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    paths = []
    for s in range(0, n, per):
        e = min(n, s + per)
        path = tmp_path / f"{s:06d}-{e:06d}.h5"
        write_shard(str(path), ShardData(
            features=x[s:e], labels=labels[s:e], indices=np.arange(s, e),
            sample_ids=[f"s{i}" for i in range(s, e)], skipped=[], attrs={"key": "k"},
            signatures=np.zeros((e - s, 256), np.float16)))
        paths.append(str(path))
    return paths


def test_exact_export_is_aligned_and_finds_each_sample_first(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from pipeline.embed import Searcher, export

    paths = _shards(tmp_path, 1500, 24)
    done = export(paths, tmp_path, EmbedSpec(), [f"c{i}" for i in range(16)], labeled=True)
    assert (done.count, done.dim, done.index, done.recall_at_10) == (1500, 24, "flat", None)
    table = pq.read_table(tmp_path / "embeddings.parquet")
    assert table.column("sample_id").to_pylist()[:2] == ["s0", "s1"]
    v = np.asarray(table.column("embedding").to_pylist(), np.float32)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    s = Searcher(tmp_path)
    got = s.by_id("s1234", k=5)
    assert got[0]["sample_id"] == "s1234" and got[0]["similarity"] == pytest.approx(1, abs=1e-4)
    assert len({n["label"] for n in got}) == 1  # its cluster
    assert [n["rank"] for n in got] == [1, 2, 3, 4, 5]
    assert s.by_vectors(v[7:8] * 5.0, k=1)[0][0]["sample_id"] == "s7"  # scale-free: cosine
    with pytest.raises(FeaturefleetError, match=r"'nope' is not in this index.*fix:"):
        s.by_id("nope")
    with pytest.raises(FeaturefleetError, match=r"no embed\.json; fix:"):
        Searcher(tmp_path / "missing")


@pytest.mark.parametrize(("kind", "floor"), [("ivfsq8", 0.8), ("ivfpq", 0.2)])
def test_ivf_indexes_report_their_recall_against_exact_search(tmp_path: Path, kind: str,
                                                              floor: float) -> None:
    from pipeline.embed import Searcher, export

    paths = _shards(tmp_path, 6000, 32)
    done = export(paths, tmp_path, EmbedSpec(index=kind, train_sample=3000,
                                             recall_queries=200, nprobe=8),
                  [f"c{i}" for i in range(16)], labeled=True)
    assert done.index == kind and done.details["trained_on"] <= 3500
    assert done.recall_at_10 is not None and floor < done.recall_at_10 <= 1.0
    meta = json.loads((tmp_path / "embed.json").read_text())
    assert meta["recall_at_10"] == done.recall_at_10 and meta["nlist"] >= 16
    hits = Searcher(tmp_path).by_id("s42", k=10)
    assert "s42" in [n["sample_id"] for n in hits]
    auto = export(paths, tmp_path, EmbedSpec(exact_up_to=5000, train_sample=3000,
                                             recall_queries=50), [], labeled=False)
    assert auto.index == "ivfsq8"  # auto: exact up to exact_up_to, then 8-bit IVF


@pytest.mark.integration
def test_embed_job_exports_searches_and_shows_examples(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline import submit

    spec = JobSpec.from_dict({"name": "test-embed", "kind": "embed",
                              "data": {"source": "digits", "limit": 300, "shard_size": 128},
                              "backbone": {"name": "efficientnet_lite0", "image_size": 32},
                              "quality": {"enabled": False}, "output": str(tmp_path / "out"),
                              "store": str(tmp_path / "out" / "store")})
    job = submit(spec, broker=cluster.broker)
    st = job.wait(timeout=300)
    assert st["status"] == "SUCCESS", st.get("error")
    rep = job.result()
    assert rep["kind"] == "embed" and rep["embeddings"]["count"] == 300
    assert rep["embeddings"]["index"] == "flat" and len(rep["examples"]) == 4
    html = Path(st["report"]).with_suffix(".html").read_text()
    assert html.count("data:image/png;base64") >= 4 and "Example queries" in html
    first = rep["examples"][0]["neighbours"]
    assert first[0]["sample_id"] == rep["examples"][0]["query"]
    # the CLI: by a stored id, and by a new image embedded with the job's backbone
    cmd = [sys.executable, "-m", "pipeline", "search", st["job_dir"], "-k", "5", "--json"]
    out = subprocess.run([*cmd, "--id", first[1]["sample_id"]], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["sample_id"] == first[1]["sample_id"]
    # a stored digit saved as a PNG file: embedded as the job embedded it, it finds itself
    d = load_digits()
    stored = int(first[0]["index"])
    Image.fromarray(np.round(d.images[stored] * 255 / 16).astype(np.uint8)).save(
        tmp_path / "q.png")
    out = subprocess.run([*cmd, "--image", str(tmp_path / "q.png")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(got) == 5 and got[0]["index"] == stored and got[0]["similarity"] > 0.99, got
    bad = subprocess.run([*cmd, "--image", str(tmp_path / "nope.png")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "cannot read image" in bad.stderr and "fix:" in bad.stderr
    bad = subprocess.run([*cmd, "--text", "a seven"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "embeds image samples, not text; fix: search it with " \
        "--image" in bad.stderr, bad.stderr
    bad = subprocess.run([*cmd, "--id", "17", "-k", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "-k 0 is out of range; fix:" in bad.stderr
