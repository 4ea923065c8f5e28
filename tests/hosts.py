"""Test-only: a fleet of real hosts on this machine, as network namespaces.

Each host is a network namespace with one veth link into a switch namespace (a Linux bridge),
addressed from the benchmarking range 198.18.0.0/15; traffic flows only between these
namespaces. Processes started on a host run inside its namespace (``ip netns exec``) and see
the same file system (the "shared folder" of a fleet). :meth:`Hosts.cut` takes a host off the
network (its link down) and kills its processes, as a lost machine. Everything is deleted when
the context ends. Needs root and ``ip`` (iproute2); :func:`available` says whether they work.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from workers.launcher import Proc, spawn


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def available() -> bool:
    """Whether this process may create network namespaces."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"ffprobe{os.getpid()}"
    ok = _ip("netns", "add", name, check=False).returncode == 0
    _ip("netns", "del", name, check=False)
    return ok


@dataclass
class Host:
    name: str  # the namespace
    address: str
    link: str  # its veth end in the switch namespace
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, label: str, argv: list[str], log: Path,
              env: dict[str, str] | None = None) -> Proc:
        proc = spawn(label, ["ip", "netns", "exec", self.name, *argv], log, env)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, env=env, timeout=timeout, check=False)


@dataclass
class Hosts:
    tag: str
    subnet: str  # "198.18.<n>"
    switch: str
    hosts: list[Host]

    def cut(self, host: Host) -> None:
        """Take ``host`` off the network and kill everything it runs (a lost machine)."""
        _ip("-n", self.switch, "link", "set", host.link, "down", check=False)
        for p in host.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGKILL)
        for p in host.procs:
            with contextlib.suppress(Exception):
                p.popen.wait(10)


def _sweep_stale() -> None:
    """Delete the namespaces (and kill the processes) of an earlier test run that was killed
    before it could clean up (the process that made them is gone)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(r"ff(\d+)(?:sw|h\d+)", name)
        if not m or Path(f"/proc/{m.group(1)}").exists():
            continue  # not ours, or its test run is alive
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def hosts(n: int) -> Iterator[Hosts]:
    """``n`` hosts on one switch, addressed ``198.18.<k>.1 .. .n`` (``k`` from the pid)."""
    _sweep_stale()
    tag = f"ff{os.getpid()}"
    subnet = f"198.18.{os.getpid() % 250 + 1}"
    switch = f"{tag}sw"
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        out = []
        for k in range(1, n + 1):
            ns, link = f"{tag}h{k}", f"v{k}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", link,
                "netns", switch)
            _ip("-n", ns, "addr", "add", f"{subnet}.{k}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", switch, "link", "set", link, "master", "br0")
            _ip("-n", switch, "link", "set", link, "up")
            out.append(Host(ns, f"{subnet}.{k}", link))
        fleet = Hosts(tag, subnet, switch, out)
        yield fleet
    finally:
        for h in locals().get("out", []):
            for p in h.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
        for ns in reversed(made):
            _ip("netns", "pids", ns, check=False)
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
