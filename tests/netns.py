"""Helpers for tests that build hosts in network namespaces (root, iproute2 and nftables)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys

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
