"""Helpers for tests that build hosts in network namespaces (root, iproute2 and nftables)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess

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
