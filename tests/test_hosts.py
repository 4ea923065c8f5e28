"""A fleet on real hosts: network namespaces this test creates (``tests/hosts.py``), addressed
from 198.18.0.0/15, deleted at the end. Redis runs on one host, workers on others, the client
on its own; every connection crosses the (virtual) network, none uses loopback.

- extraction across two worker hosts, one cut off mid-job (link down, processes killed): the
  job finishes on the other, every shard exactly once;
- a two-node DDP pretraining run across two hosts: the nodes meet through Redis, the
  rendezvous publishes the address the other host reaches, gloo runs over the hosts' link.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import hosts
from tests.conftest import small_spec
from workers.launcher import ROOT, WORKER_ENV, find_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.hosts,
              pytest.mark.skipif(not hosts.available(),
                                 reason="needs root and ip netns (network namespaces)")]

CLIENT = r"""
import json, sys, time
from pipeline import submit, JobSpec
from pipeline.client.api import Job
spec = JobSpec.from_dict(json.load(open(sys.argv[1])))
job = submit(spec, broker=sys.argv[2])
print("id", job.id, flush=True)
while True:
    st = job.status()
    if st.get("shards_done", 0) >= 1 or st.get("stage") in ("pretrain", "train") or \
            st["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
        print("started", flush=True)
        break
    time.sleep(0.2)
st = job.wait(timeout=float(sys.argv[3]))
rep = job.result() if st["status"] == "SUCCESS" else None
print("end", json.dumps({"status": st, "report": rep}), flush=True)
"""


def _fleet_env(broker: str, host: hosts.Host, extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **WORKER_ENV, "FEATUREFLEET_BROKER_URL": broker,
            "PYTHONPATH": str(ROOT), **extra}


def _start(net: hosts.Hosts, workdir: Path, workers: list[hosts.Host],
           env: dict[str, str]) -> str:
    """Redis on the first host; on each of ``workers`` a GPU-queue and a train-queue worker."""
    redis_host = net.hosts[0]
    password = secrets.token_urlsafe(16)
    conf = workdir / "redis.conf"
    conf.write_text(f"requirepass {password}\n")
    redis_host.spawn("redis", [find_redis_server(), str(conf), "--port", "6379", "--bind",
                               redis_host.address, "--dir", str(workdir), "--save", "",
                               "--appendonly", "no"], workdir / "redis.log")
    broker = f"redis://:{password}@{redis_host.address}:6379/0"
    _start_workers(net, workdir, workers, broker, env)
    return broker


def _victim_mid_slice(out: Path, nodes: tuple[hosts.Host, ...]) -> hosts.Host | None:
    """Once a checkpoint exists, the node to cut in a slice that is running (its nodes' run
    files written, its status file not yet): the one not serving that slice's rendezvous.
    None until then. Read from the files the node tasks write on the shared folder: no
    process to start, however busy the machine."""
    pre = out / "pretrain"
    if not list(pre.glob("*/last.pt")):
        return None
    for part in sorted({f.name.split("-")[1] for f in pre.glob("*/run-p*-n*.json")}):
        if list(pre.glob(f"*/status-{part}-*.json")):
            continue  # that slice is over: a cut now would lose no node
        for f in pre.glob(f"*/run-{part}-*-n*.json"):
            with contextlib.suppress(ValueError, OSError):
                run = json.loads(f.read_text())
                if run.get("is_host"):
                    host = str(run["endpoint"]).rsplit(":", 1)[0]
                    return next(h for h in nodes if h.address != host)
    return None


def _start_workers(net: hosts.Hosts, workdir: Path, workers: list[hosts.Host], broker: str,
                   env: dict[str, str]) -> None:
    (workdir / "broker").write_text(broker)
    (workdir / "client-ns").write_text(net.hosts[-1].name)
    for h in workers:
        for queue in ("ff.extract", "ff.train"):
            name = f"{queue.split('.')[1]}@{h.name}"
            h.spawn(name, [sys.executable, "-m", "celery", "-A", "workers.app", "worker",
                           "-Q", queue, "-c", "1", "-n", name, "--without-gossip",
                           "--without-mingle", "--loglevel", "INFO",
                           "--include", "tests.chaos"],
                    workdir / f"{name}.log", _fleet_env(broker, h, env))
    return broker


def _client(net: hosts.Hosts, spec: dict[str, Any], broker: str, workdir: Path,
            timeout: float) -> subprocess.Popen[str]:
    (workdir / "spec.json").write_text(json.dumps(spec))
    (workdir / "client.py").write_text(CLIENT)
    client = net.hosts[-1]
    return subprocess.Popen(["ip", "netns", "exec", client.name, sys.executable,
                             str(workdir / "client.py"), str(workdir / "spec.json"), broker,
                             str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _lines(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield line.rstrip("\n")


def _end(lines: Any, proc: subprocess.Popen[str]) -> dict[str, Any]:
    for line in lines:
        if line.startswith("end "):
            return dict(json.loads(line[4:]))
    raise AssertionError(f"the client ended without a result: {proc.stderr.read()[-3000:]}")


def _logs(workdir: Path) -> str:
    return "\n".join(f"== {p.name}\n" + p.read_text(errors="replace")[-1500:]
                     for p in sorted(workdir.glob("*.log")))


def test_a_host_cut_off_mid_extraction_loses_nothing(tmp_path: Path) -> None:
    spec = small_spec(tmp_path / "out", limit=240, shard_size=30).to_dict()
    with hosts.hosts(4) as net:
        h2, h3 = net.hosts[1], net.hosts[2]
        # shards take >= 2 s each (both extraction hosts busy when one is cut); a lost host's
        # messages come back after the visibility timeout (15 s here) + the 10 s sweep
        broker = _start(net, tmp_path, [h2, h3], {"CHAOS_SLOW_SHARD_S": "2",
                                                  "FEATUREFLEET_VISIBILITY_TIMEOUT": "15",
                                                  "PYTHONPATH": str(ROOT)})
        proc = _client(net, spec, broker, tmp_path, timeout=400)
        lines = _lines(proc)
        assert next(lines).startswith("id "), proc.stderr.read() if proc.stderr else ""
        assert next(lines) == "started", _logs(tmp_path)
        time.sleep(1.0)
        net.cut(h2)
        out = _end(lines, proc)
    st, rep = out["status"], out["report"]
    assert st["status"] == "SUCCESS", (st.get("error"), _logs(tmp_path))
    ids = [s["id"] for s in rep["shards"]]
    assert len(ids) == len(set(ids)) == st["shards_total"] == 8
    assert st["shards_done"] == 8
    # the cut host held a shard when it was lost (received, never finished there)
    cut_log = (tmp_path / f"extract@{h2.name}.log").read_text(errors="replace")
    assert cut_log.count("extract_shard[") > 2 * cut_log.count("succeeded in"), cut_log[-2000:]
    assert rep["metrics"]["top1"] > 0.5


def test_two_node_pretraining_across_hosts(tmp_path: Path) -> None:
    spec = {"kind": "pretrain", "data": {"source": "digits", "limit": 256},
            "backbone": {"name": "resnet18", "weights": "random", "image_size": 32},
            "pretrain": {"method": "simclr", "epochs": 2, "batch_size": 32, "hflip": False,
                         "nodes": 2, "eval_every_epochs": 1},
            "output": str(tmp_path / "out")}
    with hosts.hosts(4) as net:
        h2, h3 = net.hosts[1], net.hosts[2]
        broker = _start(net, tmp_path, [h2, h3], {"FEATUREFLEET_DIST_TIMEOUT_S": "120"})
        proc = _client(net, spec, broker, tmp_path, timeout=500)
        out = _end(_lines(proc), proc)
    st, rep = out["status"], out["report"]
    assert st["status"] == "SUCCESS", (st.get("error"), _logs(tmp_path))
    train = rep["train"]
    assert train["world_size"] == 2
    assert [h["epoch"] for h in train["history"]] == [1, 2]
    assert train["global_step"] == 2 * train["steps_per_epoch"]
    # the rendezvous was published at a worker host's network address, never loopback
    assert st["rendezvous"].rsplit(":", 1)[0] in {h2.address, h3.address}, st["rendezvous"]


def test_a_host_cut_off_mid_training_regroups_and_the_run_finishes(tmp_path: Path) -> None:
    """Two-node pretraining on hosts 2 and 3, a spare worker on host 4. The node that does not
    serve the rendezvous is cut off after the first checkpoint: its task comes back (after the
    visibility timeout) on the spare host, every node meets again in the next generation and
    the ranks resume from the checkpoint; every step runs exactly once."""
    spec = {"kind": "pretrain", "data": {"source": "digits", "limit": 512},
            "backbone": {"name": "resnet18", "weights": "random", "image_size": 32},
            "pretrain": {"method": "simclr", "epochs": 4, "batch_size": 32, "hflip": False,
                         "nodes": 2, "eval_every_epochs": 0, "checkpoint_every_steps": 2},
            "output": str(tmp_path / "out")}
    with hosts.hosts(5) as net:
        h2, h3, h4 = net.hosts[1], net.hosts[2], net.hosts[3]
        # slices shorter than the visibility timeout: no running node task is delivered again.
        # The cut must land inside a running slice (a cut between two slices loses no node: the
        # next slice's tasks simply go elsewhere). So the victim is chosen from the run files
        # the nodes write on the shared folder (a file read) and only while a slice runs; the
        # spare host starts after the cut. Three CI runs failed when slow steps (starting the
        # spare, reading the rendezvous through a process in the client's namespace: once
        # longer than the whole run) came between the checkpoint and the cut.
        env = {"FEATUREFLEET_VISIBILITY_TIMEOUT": "45", "FEATUREFLEET_FINETUNE_SLICE_S": "20"}
        broker = _start(net, tmp_path, [h2, h3], env)
        proc = _client(net, spec, broker, tmp_path, timeout=500)
        lines = _lines(proc)
        assert next(lines).startswith("id ")
        # (the client's "started" line is read after the cut: the cut waits on the files
        # alone. In one CI run nothing was cut although the files said a slice was running
        # for 60 s; the only thing the test waited on before polling them was that line)
        deadline = time.monotonic() + 200
        while (victim := _victim_mid_slice(tmp_path / "out", (h2, h3))) is None:
            assert time.monotonic() < deadline, _logs(tmp_path)
            time.sleep(0.05)
        net.cut(victim)
        # the spare host joins after the cut (before it, it could take one of the two node
        # tasks); the lost node's task comes back to it after the visibility timeout
        _start_workers(net, tmp_path, [h4], broker, env)
        assert next(lines) == "started", _logs(tmp_path)
        out = _end(lines, proc)
    st, rep = out["status"], out["report"]
    assert st["status"] == "SUCCESS", (st.get("error"), _logs(tmp_path))
    train = rep["train"]
    assert train["world_size"] == 2
    assert [h["epoch"] for h in train["history"]] == [1, 2, 3, 4]
    assert train["global_step"] == 4 * train["steps_per_epoch"]
    assert any(r["reason"].startswith("a node or rank was lost") for r in train["resumes"]), \
        train["resumes"]
