"""Helpers for tests that build hosts in network namespaces (root, iproute2 and nftables)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def missing_prerequisite() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root for network namespaces and nftables"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (packages iproute2 and nftables; .ci/run installs them)"
    return None


requires_netns = pytest.mark.skipif(
    missing_prerequisite() is not None, reason=str(missing_prerequisite())
)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line a helper process prints, or an assertion error after ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from {proc.args!r} within {timeout}s")
    return proc.stdout.readline().strip()


def probe(ns: str, *targets: str, source: str | None = None) -> dict[str, bool]:
    """From namespace ``ns``: which ``HOST:PORT`` targets accept a TCP connection.

    A dropped SYN only times out; the short bound keeps negative probes quick.
    """
    extra = ["--timeout", "0.75", *(["--source", source] if source else [])]
    out = run(
        "ip", "netns", "exec", ns, sys.executable, "-m", "tests.e2e.agent.netprobe", "probe",
        *extra, *targets,
    )  # fmt: skip
    result: dict[str, bool] = json.loads(out.stdout)
    return result


def session_send(proc: subprocess.Popen[str]) -> str:
    """Send once more on an open netprobe session: "echo", or "cut: <why>"."""
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return read_line(proc, 10)


# The platform lab's addresses (198.18.0.0/15, the benchmarking range, for the links; the RMM is
# given by each test, since the settings service refuses benchmarking addresses in an allowlist).
PLATFORM_ROOT, PLATFORM_HOST = "198.18.1.1", "198.18.1.2"
HOST_IP, PEER_IP, UNLISTED = "198.18.0.1", "198.18.0.2", "198.18.0.30"
PEER_PORT = 8080
_REPO = Path(__file__).resolve().parents[1]


class PlatformLab:
    """Namespaces ``host`` and ``peer``; a veth from the root namespace (the platform) to ``host``.

        root namespace (platform on PLATFORM_ROOT) ── veth ── ns `host` PLATFORM_HOST
                                                  HOST_IP ── veth ── ns `peer`: PEER_IP, the RMM,
                                                                     UNLISTED (a server on :8080)

    ``tag`` keeps the namespace and link names of concurrent labs apart.
    """

    def __init__(self, tag: str, rmm: str) -> None:
        s = uuid.uuid4().hex[:6]
        self.suffix, self.tag, self.rmm = s, tag, rmm
        self.host, self.peer = f"hi-{tag}h-{s}", f"hi-{tag}p-{s}"
        self.links: list[str] = []
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def ns_python(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, sys.executable, *args]

    def setup(self) -> None:
        remove_stale_labs()
        for ns in (self.host, self.peer):
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        root_if, host_up = f"hi{self.tag}r{self.suffix}", f"hi{self.tag}u{self.suffix}"
        run("ip", "link", "add", root_if, "type", "veth", "peer", "name", host_up,
            "netns", self.host)  # fmt: skip
        self.links.append(root_if)
        run("ip", "addr", "add", f"{PLATFORM_ROOT}/24", "dev", root_if)
        run("ip", "link", "set", root_if, "up")
        run("ip", "-n", self.host, "addr", "add", f"{PLATFORM_HOST}/24", "dev", host_up)
        run("ip", "-n", self.host, "link", "set", host_up, "up")
        host_if, peer_if = f"hi{self.tag}h{self.suffix}", f"hi{self.tag}p{self.suffix}"
        run("ip", "link", "add", host_if, "netns", self.host, "type", "veth", "peer", "name",
            peer_if, "netns", self.peer)  # fmt: skip
        run("ip", "-n", self.host, "addr", "add", f"{HOST_IP}/24", "dev", host_if)
        for address in (PEER_IP, self.rmm, UNLISTED):
            run("ip", "-n", self.peer, "addr", "add", f"{address}/24", "dev", peer_if)
        run("ip", "-n", self.host, "link", "set", host_if, "up")
        run("ip", "-n", self.peer, "link", "set", peer_if, "up")
        if ipaddress.ip_address(self.rmm) not in ipaddress.ip_network(
            f"{HOST_IP}/24", strict=False
        ):
            run("ip", "-n", self.host, "route", "add", f"{self.rmm}/32", "dev", host_if)
        self.serve(self.peer, PEER_PORT)

    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, cwd=_REPO, text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def serve(self, ns: str, port: int) -> None:
        proc = self.spawn(
            self.ns_python(ns, "-m", "tests.e2e.agent.netprobe", "serve", str(port)),
            stdout=subprocess.PIPE,
        )
        assert read_line(proc, 15) == "ready"

    def reachability(self, platform_port: int) -> dict[str, bool]:
        targets = {
            "platform": f"{PLATFORM_ROOT}:{platform_port}",
            "rmm": f"{self.rmm}:{PEER_PORT}",
            "unlisted": f"{UNLISTED}:{PEER_PORT}",
        }
        got = probe(self.host, *targets.values())
        return {name: got[target] for name, target in targets.items()}

    def table_exists(self) -> bool:
        listed = run("ip", "netns", "exec", self.host, "nft", "list", "table", "inet", "hostiso",
                     check=False)  # fmt: skip
        return listed.returncode == 0

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(timeout=10)
        for link in self.links:
            run("ip", "link", "del", link, check=False)
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)


def remove_stale_labs() -> None:
    """Delete the namespaces of labs whose run was killed before its cleanup (no process left).

    Every lab puts PLATFORM_ROOT on a root-namespace veth whose peer lives in the lab's ``host``
    namespace, so one left behind by a killed run would shadow the next lab's route to the
    platform; deleting its namespace deletes that veth too. Labs of one suite run one at a time.
    """
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("hi-"):
            continue
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        )
        if pids.returncode == 0 and not pids.stdout.strip():
            run("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def platform_lab(lab: PlatformLab) -> Iterator[PlatformLab]:
    """``lab`` set up, and torn down whatever happens."""
    try:
        lab.setup()
        yield lab
    finally:
        lab.cleanup()
