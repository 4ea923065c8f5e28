from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

import pipeline
from pipeline.errors import SpecError
from pipeline.spec import BackboneSpec, DataSpec, JobSpec

GOOD = """
name: digits-lite0
data: {source: digits, test_fraction: 0.25, seed: 3, shard_size: 128}
backbone: {name: efficientnet_lite0, image_size: 64, batch_size: 16}
probe: {l2: 1e-3}
output: /tmp/ff-out
"""


def test_yaml_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(GOOD)
    spec = JobSpec.from_file(f)
    assert spec.data.seed == 3 and spec.data.shard_size == 128
    assert spec.backbone.image_size == 64 and spec.probe.l2 == pytest.approx(1e-3)
    assert spec.store_dir == "/tmp/ff-out/store"
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_spec_is_frozen_and_replace_validates_again() -> None:
    spec = JobSpec()
    with pytest.raises(ValidationError):
        spec.name = "x"  # type: ignore[misc]
    bigger = spec.replace(backbone={"image_size": 64}, data={"seed": 4})
    assert bigger.backbone.image_size == 64 and bigger.backbone.name == spec.backbone.name
    assert bigger.data.seed == 4 and spec.data.seed == 0
    with pytest.raises(SpecError, match=r"'data.shard_size': 0 must be > 0"):
        spec.replace(data={"shard_size": 0})
    with pytest.raises(SpecError, match=r"'data.seed'"):  # sections validate when made too
        DataSpec(seed=-1)
    with pytest.raises(SpecError, match=r"'backbone.batch_size'.*9000"):
        BackboneSpec(batch_size=9000)


@pytest.mark.parametrize(("raw", "field", "words"), [
    ({"data": {"shard_size": 0}}, "data.shard_size", "must be > 0"),
    ({"data": {"shard_size": "ten"}}, "data.shard_size", "is not an int"),
    ({"data": {"source": "tarballs"}}, "data.source", "unknown source"),
    ({"data": {"source": "imagefolder"}}, "data.path", "needs a path"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "not in (0, 1)"),
    ({"data": {"sorce": "digits"}}, "data.sorce", "unknown field"),
    ({"backbone": {"batch_size": -1}}, "backbone.batch_size", "must be > 0"),
    ({"backbone": {"image_size": 4}}, "backbone.image_size", "too small"),
    ({"backbone": {"feature_dtype": "int8"}}, "backbone.feature_dtype", "unknown dtype"),
    ({"backbone": {"device": "tpu"}}, "backbone.device", "unknown device"),
    ({"probe": {"l2": -1}}, "probe.l2", ">= 0"),
    ({"strategy": "magic"}, "strategy", "unknown strategy"),
    ({"backbone": "resnet50"}, "backbone", "expected a mapping"),
    ([1, 2], "<spec>", "expected a mapping"),
    # every number has an upper bound, named with the fix
    ({"probe": {"sweep_tasks": 10_000}}, "probe.sweep_tasks", "must be <= 64"),
    ({"probe": {"grid_points": 10**6}}, "probe.grid_points", "must be <= 1000"),
    ({"backbone": {"image_size": 100_000}}, "backbone.image_size", "too large"),
    ({"backbone": {"batch_size": 10**7}}, "backbone.batch_size", "<= 8192"),
    ({"data": {"shard_size": 10**9}}, "data.shard_size", "must be <= 100000"),
    ({"finetune": {"epochs": 10**9}}, "finetune.epochs", "must be <= 10000"),
    ({"data": {"seed": -3}}, "data.seed", "must be >= 0"),
    ({"finetune": {"lr": True}}, "finetune.lr", "True is not a number"),
    ({"probe": {"heads": ["linear", "svm"]}}, "probe.heads", "unknown head 'svm'"),
    ({"probe": {"grid_low": 10, "grid_high": 1}}, "probe.grid_low", "not increasing"),
    ({"name": "x" * 10_000}, "name", "characters)"),
])
def test_invalid_fields_name_field_and_fix(raw: object, field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(raw)
    msg = str(info.value)
    assert info.value.field == field
    assert words in msg and "fix:" in msg and "\n" not in msg


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("data: {source: digits\nbackbone: [")
    with pytest.raises(SpecError, match=r"not valid YAML/JSON.*fix:") as info:
        JobSpec.from_file(f)
    assert "\n" not in str(info.value)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        JobSpec.from_file(tmp_path / "nope.yaml")


def test_resolved_makes_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = JobSpec.from_dict({"data": {"source": "npz", "path": "x.npz"}, "output": "out"})
    r = spec.resolved()
    assert r.data.path == str(tmp_path / "x.npz")
    assert r.output == str(tmp_path / "out") and r.store == str(tmp_path / "out" / "store")


def test_public_api_is_small_and_honest() -> None:
    assert sorted(pipeline.__all__) == ["BackboneSpec", "DataSpec", "FeaturefleetError",
                                        "FinetuneSpec", "Job", "JobSpec", "ProbeSpec",
                                        "compare", "get_job", "load_classifier", "submit"]
    for name in pipeline.__all__:
        obj = getattr(pipeline, name)
        assert getattr(obj, "__name__", name) == name  # the real object, under its own name
    with pytest.raises(AttributeError):
        pipeline.nothing_here  # noqa: B018
    assert sorted(dir(pipeline)) == sorted(pipeline.__all__)


def test_error_messages_quote_only_a_prefix_of_huge_values() -> None:
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict({"data": {"source": "s" * 100_000}})
    assert len(str(info.value)) < 400 and "100002 characters" in str(info.value)


def test_yaml_alias_bomb_and_oversized_files_are_refused(tmp_path: Path) -> None:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10**9 leaves once expanded
        bomb.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    with pytest.raises(SpecError, match=r"expands to more than 100000 values.*fix:") as info:
        JobSpec.from_file(tmp_path / "bomb.yaml")
    assert len(str(info.value)) < 400
    (tmp_path / "big.yaml").write_text("name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(SpecError, match=r"bytes \(a job file is at most"):
        JobSpec.from_file(tmp_path / "big.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        JobSpec.from_file(tmp_path / "latin1.yaml")


def test_finetune_and_strategy_fields_validate_with_a_fix() -> None:
    spec = JobSpec.from_dict({"strategy": "finetune", "time_budget_s": 600,
                              "finetune": {"epochs": 3, "optimizer": "sgd", "lr": "3e-3",
                                           "hflip": False, "checkpoint_every_steps": 50}})
    assert spec.finetune.lr == 3e-3 and spec.finetune.optimizer == "sgd"
    assert spec.time_budget_s == 600.0
    cases = [({"strategy": "distill"}, r"'strategy'.*'distill'.*probe, finetune, auto"),
             ({"finetune": {"optimizer": "lamb"}}, r"finetune.optimizer.*'lamb'.*adamw, sgd"),
             ({"finetune": {"batch_size": 1}}, r"finetune.batch_size.*batch norm"),
             ({"finetune": {"label_smoothing": 1.5}}, r"finetune.label_smoothing.*\[0, 1\)"),
             ({"finetune": {"crop_scale_min": 0}}, r"finetune.crop_scale_min"),
             ({"finetune": {"lr": 0}}, r"finetune.lr.*> 0"),
             ({"finetune": {"device": "tpu"}}, r"finetune.device.*'tpu'"),
             ({"time_budget_s": -5}, r"time_budget_s.*-5"),
             ({"finetune": {"epoch": 3}}, r"finetune.epoch.*unknown field.*epochs")]
    for raw, pattern in cases:
        with pytest.raises(SpecError, match=pattern):
            JobSpec.from_dict(raw)
