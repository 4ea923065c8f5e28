"""Security: JSON-only messages, TLS with certificate checking, no secrets in logs or records,
path validation, message size limit."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import submit
from pipeline.errors import BrokerError, SpecError
from pipeline.plan import check_plan
from pipeline.planner import make_plan
from pipeline.settings import ALLOWED_ROOTS_ENV
from tests.conftest import small_spec
from workers.launcher import (
    LocalCluster,
    find_redis_server,
    free_port,
    spawn,
    start_worker,
    wait_for_workers,
)

pytestmark = [pytest.mark.integration, pytest.mark.security]


class Exploit:
    """Unpickling this creates a marker file: proof that pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path(self.marker).write_text, ("pwned",))


def test_pickle_message_is_refused_and_never_executed(cluster: LocalCluster,
                                                      tmp_path: Path) -> None:
    from celery import Celery

    marker = tmp_path / "pwned"
    evil = Celery("evil", broker=cluster.broker, set_as_current=False)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    try:
        evil.send_task("featurefleet.fail_job", args=(Exploit(str(marker)),),
                       queue="ff.extract", serializer="pickle")
        evil.send_task("featurefleet.fail_job", args=(Exploit(str(marker)),),
                       queue="ff.train", serializer="pickle")
    finally:
        evil.close()
    time.sleep(3)
    assert not marker.exists()
    logs = "".join(p.log.read_text(errors="replace") for p in cluster.procs)
    assert "Refusing to deserialize untrusted content of type pickle" in logs


def test_no_secret_in_logs_records_or_reports(cluster: LocalCluster, tmp_path: Path) -> None:
    job = submit(small_spec(tmp_path, limit=100), broker=cluster.broker)
    assert job.wait(timeout=240)["status"] == "SUCCESS"
    assert cluster.redis is not None
    secret = cluster.redis.password
    logs = "".join(p.log.read_text(errors="replace") for p in cluster.procs)
    assert "redis://:**@" in logs and secret not in logs
    assert secret not in str(job.status())
    for f in Path(job.status()["job_dir"]).iterdir():
        if f.suffix in (".json", ".html"):
            assert secret not in f.read_text(), f


def test_paths_outside_the_allowed_roots_are_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(tmp_path / "allowed"))
    ok = make_plan(small_spec(tmp_path / "allowed" / "x"), "0000000000aa")
    check_plan(ok)
    bad = make_plan(small_spec(tmp_path / "elsewhere"), "0000000000bb")
    with pytest.raises(SpecError, match=r"outside the allowed roots.*fix:"):
        check_plan(bad)


def test_every_message_sent_is_size_checked(cluster: LocalCluster,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients and workers refuse to put bulk data on the broker: the check runs on the
    message actually sent, whatever built it."""
    from workers.app import make_app

    monkeypatch.setenv("FEATUREFLEET_MAX_MESSAGE_BYTES", "2000")
    app = make_app(cluster.broker)
    try:
        app.send_task("featurefleet.fail_job", args=("x" * 100,), queue="ff.nowhere")  # fine
        with pytest.raises(BrokerError, match=r"featurefleet.collect would send a \d+-byte "
                                              r"message \(limit 2000\).*fix:"):
            app.send_task("featurefleet.collect", args=(["y" * 5000],), queue="ff.nowhere")
    finally:
        app.close()
    from pipeline.jobs.broker import connect

    assert connect(cluster.broker).llen("ff.nowhere") == 1  # only the small one went out


def _certs(d: Path) -> dict[str, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ff-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
        "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt")
    return {k: d / f"{k}" for k in ("ca.crt", "server.crt", "server.key")}


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="needs the openssl command")
def test_job_over_tls_with_certificate_checking(tmp_path: Path) -> None:
    import redis as redis_py

    certs = _certs(tmp_path)
    port, password = free_port(), "tls-secret"
    conf = tmp_path / "redis.conf"
    conf.write_text(f"requirepass {password}\n")
    server = spawn("redis-tls", [find_redis_server(), str(conf), "--port", "0",
                                 "--tls-port", str(port), "--bind", "127.0.0.1",
                                 "--tls-cert-file", str(certs["server.crt"]),
                                 "--tls-key-file", str(certs["server.key"]),
                                 "--tls-ca-cert-file", str(certs["ca.crt"]),
                                 "--tls-auth-clients", "no", "--save", "",
                                 "--dir", str(tmp_path)], tmp_path / "redis.log")
    url = (f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required"
           f"&ssl_ca_certs={certs['ca.crt']}")
    procs = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_py.Redis.from_url(url).ping()
                break
            except redis_py.ConnectionError:
                assert server.alive(), f"redis-server did not start with TLS: " \
                                       f"{server.log_tail(5)}"
                assert time.monotonic() < deadline, "redis-server (TLS) did not answer"
                time.sleep(0.1)
        # A client that does not trust the CA is refused.
        untrusted = url.replace(f"&ssl_ca_certs={certs['ca.crt']}", "")
        with pytest.raises(redis_py.ConnectionError):
            redis_py.Redis.from_url(untrusted).ping()
        logs = tmp_path / "logs"
        procs = [start_worker(url, ["ff.extract"], "tx@tls", logs),
                 start_worker(url, ["ff.train"], "tt@tls", logs)]
        wait_for_workers(url, ["tx@tls", "tt@tls"], procs)
        job = submit(small_spec(tmp_path, limit=100), broker=url)
        assert job.wait(timeout=240)["status"] == "SUCCESS"
    finally:
        for p in procs:
            p.stop(timeout=10)
        server.stop()
    assert os.path.getsize(tmp_path / "redis.log") > 0


def test_forged_messages_cannot_write_outside_the_allowed_roots(tmp_path: Path) -> None:
    """Messages sent straight to the broker (not built by the client): every task checks the
    plan reference and every path in the plan; a job id is an id, never a path."""
    import hashlib
    import json

    from pipeline.plan import PlanRef
    from workers.app import make_app

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    cluster = LocalCluster(tmp_path / "cluster", env={ALLOWED_ROOTS_ENV: str(allowed)})
    cluster.start()
    try:
        # a plan made for an output outside the roots (what an attacker can write anywhere)
        evil = make_plan(small_spec(outside), "0000000000ee")
        ref = evil.save().to_message()
        inside = make_plan(small_spec(allowed / "x"), "0000000000dd")
        good = inside.save()
        # the same job's plan rewritten after submission to point the store elsewhere
        edited = json.loads(inside.path.read_text())
        edited["spec"]["store"] = str(outside / "store")
        inside.path.write_text(json.dumps(edited))
        rewritten = {**good.to_message(),
                     "sha256": hashlib.sha256(inside.path.read_text().encode()).hexdigest()}
        sends = {
            "collect outside": ("featurefleet.collect", ([], ref)),
            "evaluate with a path as job id": ("featurefleet.evaluate", (
                {}, {**ref, "job_id": "../../../tmp"})),
            "extract with a plan edited to write outside": (
                "featurefleet.extract_shard", (rewritten, "0-64")),
            "extract with a stale checksum": ("featurefleet.extract_shard", (
                good.to_message(), "0-64")),
            "extract a shard not in the plan": ("featurefleet.extract_shard", (
                rewritten, "../../etc")),
            "fail_job with a path as job id": ("featurefleet.fail_job", (None, None, None,
                                                                        "../../../tmp/x")),
        }
        app = make_app(cluster.broker)
        try:
            results = {name: app.send_task(task, args=args,
                                           queue="ff.extract" if "extract" in task else
                                           "ff.train") for name, (task, args) in sends.items()}
            errors = {}
            for name, res in results.items():
                res.get(timeout=60, propagate=False)
                errors[name] = str(res.result)
        finally:
            app.close()
        assert "outside the allowed roots" in errors["collect outside"]
        assert "is not a job id" in errors["evaluate with a path as job id"]
        assert "outside the allowed roots" in errors["extract with a plan edited to write "
                                                     "outside"]
        assert "changed since the job was submitted" in errors["extract with a stale checksum"]
        assert "outside the allowed roots" in errors["extract a shard not in the plan"] or \
            "has no shard" in errors["extract a shard not in the plan"]
        assert "'../../../tmp/x' is not a job id" in errors["fail_job with a path as job id"]
    finally:
        cluster.stop()
    written = [p for p in outside.rglob("*") if p.is_file() and p.name not in (
        "plan.json", "spec.json", "samples.npy")]
    assert written == []  # no manifest, shard, report or error file outside the roots
    assert not (tmp_path / "tmp").exists() and not Path("/tmp/x/error.json").exists()
    assert isinstance(PlanRef.model_validate(ref), PlanRef)
