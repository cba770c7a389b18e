"""The agent's nftables enforcement for real, in two network namespaces joined by a veth pair.

``host`` runs the agent's apply step and an echo listener; ``peer`` holds the platform, an
allowlisted RMM and an unlisted server as addresses of one echo server. Addresses come from
198.18.0.0/15 (benchmarking range).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.addresses import HostFacts
from agent.nft import parse_counters, render_ruleset, rules_sha256, usage_table
from shared.messages import FrozenPolicy, PolicyMode, SignedPolicy
from tests.netns import probe, read_line, requires_netns, run, session_send
from tests.unit.agent.policies import TestSigner, make_policy

ROOT = Path(__file__).resolve().parents[3]
HOST_IP, PEER_IP = "198.18.0.1", "198.18.0.2"
PLATFORM, RMM, UNLISTED, RESOLVER = "198.18.0.10", "198.18.0.20", "198.18.0.30", "198.18.0.53"
PORT, LISTENER_PORT = 8080, 9000
TABLE = "hostiso"


pytestmark = requires_netns


class NetLab:
    """Two namespaces, a veth pair, the servers, and the agent's apply step run inside ``host``."""

    def __init__(self, workdir: Path) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.host, self.peer = f"hi-h-{suffix}", f"hi-p-{suffix}"
        self.veth_host, self.veth_peer = f"hih{suffix}", f"hip{suffix}"
        self.workdir = workdir
        self.procs: list[subprocess.Popen[str]] = []
        self.signer = TestSigner()
        self.namespaces: list[str] = []

    @staticmethod
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*args, check=check)

    def exec_args(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def python_args(self, ns: str, module: str, *args: str) -> list[str]:
        return self.exec_args(ns, sys.executable, "-m", module, *args)

    def setup(self) -> None:
        for ns in (self.host, self.peer):
            self.run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            self.run("ip", "-n", ns, "link", "set", "lo", "up")
        self.run(
            "ip", "link", "add", self.veth_host, "netns", self.host,
            "type", "veth", "peer", "name", self.veth_peer, "netns", self.peer,
        )  # fmt: skip
        self.run("ip", "-n", self.host, "addr", "add", f"{HOST_IP}/24", "dev", self.veth_host)
        for address in (PEER_IP, PLATFORM, RMM, UNLISTED):
            self.run("ip", "-n", self.peer, "addr", "add", f"{address}/24", "dev", self.veth_peer)
        self.run("ip", "-n", self.host, "link", "set", self.veth_host, "up")
        self.run("ip", "-n", self.peer, "link", "set", self.veth_peer, "up")
        self.start_server(self.peer, PORT)
        self.start_server(self.host, LISTENER_PORT)

    def spawn(self, args: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    def start_server(self, ns: str, port: int) -> None:
        proc = self.spawn(self.python_args(ns, "tests.e2e.agent.netprobe", "serve", str(port)))
        assert read_line(proc, 15) == "ready"

    probe = staticmethod(probe)

    def outbound(self) -> dict[str, bool]:
        """From ``host``: which of platform / RMM / unlisted answer."""
        got = self.probe(self.host, *(f"{a}:{PORT}" for a in (PLATFORM, RMM, UNLISTED)))
        return {
            name: got[f"{a}:{PORT}"]
            for name, a in (("platform", PLATFORM), ("rmm", RMM), ("unlisted", UNLISTED))
        }

    def inbound_from(self, source: str) -> bool:
        """A new connection from ``source`` (a peer address) to the listener in ``host``."""
        return self.probe(self.peer, f"{HOST_IP}:{LISTENER_PORT}", source=source)[
            f"{HOST_IP}:{LISTENER_PORT}"
        ]

    def open_inbound_session(self, source: str) -> subprocess.Popen[str]:
        proc = self.spawn(
            self.python_args(
                self.peer, "tests.e2e.agent.netprobe", "session",
                "--source", source, f"{HOST_IP}:{LISTENER_PORT}",
            )
        )  # fmt: skip
        assert read_line(proc, 15) == "connected"
        return proc

    session_send = staticmethod(session_send)

    def apply(
        self, state_dir: Path, signed: SignedPolicy, platform_probe: str = f"{PLATFORM}:{PORT}"
    ) -> dict[str, Any]:
        policy_file = state_dir.parent / f"policy-{signed.policy.sequence}.json"
        policy_file.write_text(signed.model_dump_json())
        return self._apply_step(state_dir, "--policy-file", str(policy_file),
                                "--platform-probe", platform_probe)  # fmt: skip

    def reapply(self, state_dir: Path) -> dict[str, Any]:
        return self._apply_step(state_dir, "--reapply", "--platform-probe", f"{PLATFORM}:{PORT}")

    def _apply_step(self, state_dir: Path, *args: str) -> dict[str, Any]:
        out = self.run(
            *self.python_args(
                self.host, "tests.e2e.agent.apply_policy",
                "--state-dir", str(state_dir), "--endpoint-id", "ep-1",
                "--public-key", self.signer.public_b64, "--table", TABLE,
                "--negative-probe", f"{UNLISTED}:{PORT}", "--resolver", RESOLVER, *args,
            )
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def table(self) -> str | None:
        listed = self.run(*self.exec_args(self.host, "nft", "list", "table", "inet", TABLE),
                          check=False)  # fmt: skip
        return listed.stdout if listed.returncode == 0 else None

    def reset(self) -> None:
        for table in (TABLE, usage_table(TABLE)):
            self.run(*self.exec_args(self.host, "nft", "delete", "table", "inet", table),
                     check=False)  # fmt: skip

    def counters(self) -> dict[str, tuple[int, int]] | None:
        """The usage counters in ``host`` (``nft -j list counters``), None without the table."""
        listed = self.run(
            *self.exec_args(self.host, "nft", "-j", "list", "counters", "table", "inet",
                            usage_table(TABLE)),
            check=False,
        )  # fmt: skip
        return parse_counters(listed.stdout) if listed.returncode == 0 else None

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(timeout=10)
        for ns in self.namespaces:
            self.run("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetLab]:
    netlab = NetLab(tmp_path_factory.mktemp("netlab"))
    try:
        netlab.setup()
        yield netlab
    finally:
        netlab.cleanup()


@pytest.fixture
def state_dir(lab: NetLab, tmp_path: Path) -> Path:
    lab.reset()
    return tmp_path / "state"


def _expected_hash(policy: FrozenPolicy) -> str:
    facts = HostFacts(platform_addresses=(), dns_resolvers=(RESOLVER,))
    return rules_sha256(render_ruleset(policy, facts, TABLE))


def _policy(sequence: int, mode: PolicyMode) -> FrozenPolicy:
    return make_policy(sequence=sequence, mode=mode, allowed=(RMM,), platform=(PLATFORM,))


def test_standard_isolation_keeps_platform_and_rmm_and_blocks_the_rest(
    lab: NetLab, state_dir: Path
) -> None:
    assert lab.outbound() == {"platform": True, "rmm": True, "unlisted": True}
    session = lab.open_inbound_session(source=RMM)
    assert lab.session_send(session) == "echo"

    policy = _policy(1, "standard")
    report = lab.apply(state_dir, lab.signer.sign(policy))

    assert report["status"] == "applied", report
    assert report["rules_sha256"] == _expected_hash(policy)
    assert lab.outbound() == {"platform": True, "rmm": True, "unlisted": False}
    assert not lab.inbound_from(RMM), "inbound from the allowlisted RMM must be blocked"
    assert not lab.inbound_from(PLATFORM), "inbound from the platform must be blocked"
    assert lab.session_send(session).startswith("cut"), "pre-isolation inbound session survived"


def test_strict_isolation_blocks_the_rmm_too(lab: NetLab, state_dir: Path) -> None:
    assert lab.apply(state_dir, lab.signer.sign(_policy(1, "standard")))["status"] == "applied"
    strict = _policy(2, "strict")
    report = lab.apply(state_dir, lab.signer.sign(strict))
    assert report["status"] == "applied" and report["rules_sha256"] == _expected_hash(strict)
    assert lab.outbound() == {"platform": True, "rmm": False, "unlisted": False}
    assert not lab.inbound_from(RMM)


def test_release_opens_everything_again_and_deletes_the_table(lab: NetLab, state_dir: Path) -> None:
    assert lab.apply(state_dir, lab.signer.sign(_policy(1, "strict")))["status"] == "applied"
    assert lab.table() is not None
    report = lab.apply(state_dir, lab.signer.sign(_policy(2, "none")))
    assert report["status"] == "applied"
    assert lab.table() is None
    assert lab.outbound() == {"platform": True, "rmm": True, "unlisted": True}
    assert lab.inbound_from(RMM)


def test_unreachable_platform_rolls_back_to_the_previous_ruleset(
    lab: NetLab, state_dir: Path
) -> None:
    assert lab.apply(state_dir, lab.signer.sign(_policy(1, "standard")))["status"] == "applied"
    # Nothing listens on port 1: the positive check fails after the strict table went in.
    report = lab.apply(state_dir, lab.signer.sign(_policy(2, "strict")), f"{PLATFORM}:1")
    assert report["status"] == "failed"
    assert "positive check failed" in report["detail"] and "rolled back" in report["detail"]
    assert lab.outbound() == {"platform": True, "rmm": True, "unlisted": False}


def test_tampered_policy_changes_nothing_on_the_host(lab: NetLab, state_dir: Path) -> None:
    signed = lab.signer.sign(_policy(1, "strict"))
    tampered = signed.model_copy(update={"policy": _policy(1, "none")})
    report = lab.apply(state_dir, tampered)
    assert report["refused"] and report["status"] == "failed"
    assert "signature" in report["detail"]
    assert lab.table() is None


def test_agent_start_puts_a_vanished_table_back(lab: NetLab, state_dir: Path) -> None:
    assert lab.apply(state_dir, lab.signer.sign(_policy(1, "standard")))["status"] == "applied"
    lab.reset()  # as a reboot or `systemctl restart nftables` would
    assert lab.outbound()["unlisted"]
    assert lab.reapply(state_dir) == {"reapplied": 1}
    assert lab.outbound() == {"platform": True, "rmm": True, "unlisted": False}


def test_usage_counters_rise_when_the_host_talks_to_the_rmm_and_only_then(
    lab: NetLab, state_dir: Path
) -> None:
    policy = _policy(1, "standard")
    report = lab.apply(state_dir, lab.signer.sign(policy))
    # The counting table beside it leaves the enforcing rules and their hash as they were.
    assert report["status"] == "applied" and report["rules_sha256"] == _expected_hash(policy)
    before = lab.counters()
    assert before is not None and set(before) == {"e0"}
    assert lab.probe(lab.host, f"{UNLISTED}:{PORT}", f"{PLATFORM}:{PORT}") == {
        f"{UNLISTED}:{PORT}": False,
        f"{PLATFORM}:{PORT}": True,
    }
    assert lab.counters() == before, "blocked or platform traffic was counted for the RMM"
    assert lab.probe(lab.host, f"{RMM}:{PORT}") == {f"{RMM}:{PORT}": True}
    after = lab.counters()
    assert after is not None
    packets, size = after["e0"][0] - before["e0"][0], after["e0"][1] - before["e0"][1]
    # A TCP connect and close both ways: SYN, ACK, FIN ... out, and SYN-ACK ... back.
    assert packets >= 4 and size >= packets * 40, after

    # Strict carries no allowlist: nothing is counted, and the counting table is gone.
    assert lab.apply(state_dir, lab.signer.sign(_policy(2, "strict")))["status"] == "applied"
    assert lab.counters() is None
