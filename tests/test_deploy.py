"""deploy/ validated offline: Kubernetes manifests against the Kubernetes schemas
(kubernetes-validate), the compose file against the compose-spec schema (vendored by
check-jsonschema), and every command in them parsed by the featurefleet CLI."""

from __future__ import annotations

import json
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.client.parser import build_parser
from pipeline.settings import BROKER_ENV, FLOWER_AUTH_ENV, Settings
from workers.settings import EXTRACT_QUEUE, TRAIN_QUEUE, celery_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.33.0"


def manifests() -> list[dict[str, Any]]:
    return [d for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]


def parses(argv: list[str]) -> Any:
    """The CLI accepts these arguments (argparse exits on anything unknown)."""
    return build_parser().parse_args(argv)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_kubernetes_manifests_match_the_schemas() -> None:
    docs = manifests()
    builtin = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "featurefleet-redis"), ("Deployment", "featurefleet-worker-gpu"),
            ("Deployment", "featurefleet-worker-cpu"), ("Deployment", "featurefleet-flower"),
            ("Service", "featurefleet-flower"), ("Secret", "featurefleet-flower"),
            ("ScaledObject", "featurefleet-worker-gpu"),
            ("PersistentVolumeClaim", "featurefleet-store")} <= kinds
    # a broken manifest is refused (the check can fail)
    bad = json.loads(json.dumps(next(d for d in docs if d["kind"] == "Deployment")))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kubernetes_workers_commands_and_shutdown() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    gpu = docs[("Deployment", "featurefleet-worker-gpu")]
    (c,) = containers(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    soft = celery_config("redis://x:6379/0")["worker_soft_shutdown_timeout"]
    assert gpu["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > soft
    assert parses(c["args"]).gpus == "all"
    cpu = docs[("Deployment", "featurefleet-worker-cpu")]
    assert parses(containers(cpu)[0]["args"]).queues == TRAIN_QUEUE
    flower = docs[("Deployment", "featurefleet-flower")]
    for c in containers(flower):
        parses(c["args"])
        names = {e["name"] for e in c["env"]}
        assert BROKER_ENV in names
    assert any(e["name"] == FLOWER_AUTH_ENV and "secretKeyRef" in e["valueFrom"]
               for e in containers(flower)[0]["env"])
    redis = docs[("StatefulSet", "featurefleet-redis")]
    args = containers(redis)[0]["args"]
    assert "--appendonly" in args and "noeviction" in args and "--requirepass" in args
    assert redis["spec"]["volumeClaimTemplates"]
    secrets = {n for k, n in docs if k == "Secret"}
    for doc in (gpu, cpu, flower):
        for c in containers(doc):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets
                    keys = docs[("Secret", ref["name"])]["stringData"]
                    assert ref["key"] in keys


def test_keda_scales_gpu_workers_on_queue_and_running_tasks(jobs: Any) -> None:
    from pipeline.client.exporter import render

    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    so = docs[("ScaledObject", "featurefleet-worker-gpu")]
    assert ("Deployment", so["spec"]["scaleTargetRef"]["name"]) in docs
    triggers = {t["type"]: t for t in so["spec"]["triggers"]}
    assert triggers["redis"]["metadata"]["listName"] == EXTRACT_QUEUE
    assert triggers["redis"]["authenticationRef"]["name"] in {
        n for k, n in docs if k == "TriggerAuthentication"}
    query = triggers["prometheus"]["metadata"]["query"]

    jobs.r.hset("unacked", mapping={"a": "1", "b": "2", "c": "3"})  # 3 reserved messages
    metric = query.split("(")[1].split(")")[0]
    assert f"\n{metric} 3.0\n" in render(jobs)


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_matches_the_compose_spec() -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    doc = compose()
    jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "services": {"x": {"stop_grace_period": []}}}, schema)


def test_compose_services_and_commands() -> None:
    s = compose()["services"]
    redis = s["redis"]["command"]
    assert "--appendonly yes" in redis and "noeviction" in redis and "--requirepass" in redis
    gpu = s["worker-gpu"]
    assert parses(gpu["command"]).gpus == "all"
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["capabilities"] == ["gpu"] and "replicas" in gpu["deploy"]
    assert parses(s["worker-cpu"]["command"]).queues == TRAIN_QUEUE
    assert parses(s["flower"]["command"]).verb == "dashboard"
    assert FLOWER_AUTH_ENV in s["flower"]["environment"]
    assert BROKER_ENV in s["worker-gpu"]["environment"]
    assert parses(s["exporter"]["command"]).verb == "exporter"
    for name in ("worker-gpu", "worker-cpu", "flower"):
        assert "store:/data" in s[name]["volumes"]
    assert int(gpu["stop_grace_period"].rstrip("s")) > 60


def test_dockerfile_runs_the_cli_as_non_root() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert next(ln for ln in lines if ln.startswith("FROM")).split()[1].startswith(
        "nvidia/cuda:") and "runtime" in next(ln for ln in lines if ln.startswith("FROM"))
    user = next(ln for ln in lines if ln.startswith("USER")).split()[1]
    assert user not in ("root", "0")
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT"))[10:])
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD"))[3:])
    assert entry == ["featurefleet"] and parses(cmd).verb == "worker"


def test_deploy_guide_commands_parse() -> None:
    guide = (DEPLOY / "README.md").read_text()
    cmds = [ln.strip()[len("featurefleet "):] for ln in guide.splitlines()
            if ln.strip().startswith("featurefleet ")]
    assert len(cmds) >= 4
    for cmd in cmds:
        parses(shlex.split(cmd.split("#")[0]))


def test_every_featurefleet_variable_in_deploy_is_read_by_the_code() -> None:
    import re

    known = {f"FEATUREFLEET_{name.upper()}" for name in Settings.model_fields}
    used = {m for f in DEPLOY.rglob("*") if f.is_file()
            for m in re.findall(r"FEATUREFLEET_[A-Z_]+", f.read_text())}
    assert used and used <= known, used - known


def test_gpu_script_commands_exist_and_parse() -> None:
    """benchmarks/gpu.sh runs only on a lent GPU machine: every command it starts must exist
    and every flag it passes must parse, or the one GPU run would be lost to a typo."""
    import importlib.util
    import re

    from benchmarks.harness import parser

    root = Path(__file__).resolve().parent.parent
    script = (root / "benchmarks" / "gpu.sh").read_text().replace("\\\n", " ")
    bench_runs = scripts = 0
    for line in script.splitlines():
        line = line.split("|")[0].strip()
        if not line.startswith('"$PY"'):
            continue
        words = shlex.split(line.replace('"$PY"', "python").replace("$DEC", "auto"))
        if words[1] == "-m":
            assert importlib.util.find_spec(words[2]) is not None, words[2]
        py = next((n for n, w in enumerate(words) if w.endswith(".py")), None)
        if py is None:
            continue
        path, args = root / words[py], words[py + 1:]
        assert path.is_file(), words[py]
        scripts += 1
        if words[py] == "benchmarks/bench.py":
            parser().parse_args(args)  # SystemExit on an unknown flag or value
            bench_runs += 1
        else:
            for flag in re.findall(r"(--[a-z-]+)", " ".join(args)):
                assert f'"{flag}"' in path.read_text(), (words[py], flag)
    assert bench_runs == 2 and scripts == 4  # ResNet-50; 12 MP photos (a loop); SimCLR; BYOL
