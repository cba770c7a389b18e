"""Allowlist v2 on a real nftables host (issue 12): an IPv6 RMM reachable in standard
isolation and blocked in strict; an entry ``ports: [8041], protocol: tcp`` reachable on 8041
and not on 22; an entry that expires during the test closes at its time without a new policy.

The lab of test_nftables_netns.py plus IPv6 on the veth pair and servers on 8041 and 22.
The policies are signed here directly (the 90-day rule is the settings API's, not the agent's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.messages import AllowedPeer, FrozenPolicy, PolicyMode
from tests.e2e.agent.test_nftables_netns import (
    HOST_IP,
    PLATFORM,
    PORT,
    RMM,
    UNLISTED,
    NetLab,
)
from tests.netns import requires_netns
from tests.unit.agent.policies import make_policy

pytestmark = requires_netns

HOST6, RMM6, UNLISTED6 = "2001:db8:100::1", "2001:db8:100::20", "2001:db8:100::30"
TOOL, TOOL_PORT, SSH = "198.18.0.40", 8041, 22


class V2Lab(NetLab):
    def setup(self) -> None:
        super().setup()
        # nodad: usable at once, no duplicate-address-detection wait.
        self.run("ip", "-n", self.host, "addr", "add", f"{HOST6}/64", "dev", self.veth_host,
                 "nodad")  # fmt: skip
        for address in (RMM6, UNLISTED6):
            self.run("ip", "-n", self.peer, "addr", "add", f"{address}/64", "dev", self.veth_peer,
                     "nodad")  # fmt: skip
        self.run("ip", "-n", self.peer, "addr", "add", f"{TOOL}/24", "dev", self.veth_peer)
        self.start_server(self.peer, TOOL_PORT)
        self.start_server(self.peer, SSH)

    def reach(self, *targets: str) -> dict[str, bool]:
        return self.probe(self.host, *targets)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V2Lab]:
    netlab = V2Lab(tmp_path_factory.mktemp("netlab-v2"))
    try:
        netlab.setup()
        yield netlab
    finally:
        netlab.cleanup()


@pytest.fixture
def state_dir(lab: V2Lab, tmp_path: Path) -> Path:
    lab.reset()
    return tmp_path / "state"


def _policy(sequence: int, mode: PolicyMode, *peers: AllowedPeer) -> FrozenPolicy:
    base = make_policy(sequence=sequence, mode=mode, allowed=(), platform=(PLATFORM,))
    return base.model_copy(update={"allowed_outbound": peers if mode == "standard" else ()})


V6_RMM = AllowedPeer(name="RMM v6", address=RMM6)
TOOL_8041 = AllowedPeer(name="tool", address=TOOL, ports=(TOOL_PORT,), protocol="tcp")


def test_an_ipv6_rmm_is_reachable_in_standard_and_blocked_in_strict(
    lab: V2Lab, state_dir: Path
) -> None:
    six = (f"[{RMM6}]:{PORT}", f"[{UNLISTED6}]:{PORT}")
    assert lab.reach(*six) == dict.fromkeys(six, True), "lab: IPv6 must work before isolation"
    report = lab.apply(state_dir, lab.signer.sign(_policy(1, "standard", V6_RMM)))
    assert report["status"] == "applied", report
    assert lab.reach(*six) == {six[0]: True, six[1]: False}
    assert lab.outbound() == {"platform": True, "rmm": False, "unlisted": False}
    report = lab.apply(state_dir, lab.signer.sign(_policy(2, "strict", V6_RMM)))
    assert report["status"] == "applied", report
    assert lab.reach(*six) == dict.fromkeys(six, False)
    assert lab.outbound()["platform"]
    table = lab.table()
    assert table is not None and "icmpv6" not in table, "ND opened without an IPv6 peer"


def test_a_port_limited_entry_is_reachable_on_its_port_only(lab: V2Lab, state_dir: Path) -> None:
    tool = (f"{TOOL}:{TOOL_PORT}", f"{TOOL}:{SSH}", f"{TOOL}:{PORT}")
    assert lab.reach(*tool) == dict.fromkeys(tool, True)
    report = lab.apply(state_dir, lab.signer.sign(_policy(1, "standard", TOOL_8041)))
    assert report["status"] == "applied", report
    assert lab.reach(*tool) == {tool[0]: True, tool[1]: False, tool[2]: False}
    # Inbound from the tool's address stays closed: only replies of the host's own flows.
    assert not lab.probe(lab.peer, f"{HOST_IP}:9000", source=TOOL)[f"{HOST_IP}:9000"]


def test_an_entry_expiring_during_the_test_closes_at_its_time_without_a_new_policy(
    lab: V2Lab, state_dir: Path
) -> None:
    expires_at = datetime.now(UTC) + timedelta(seconds=20)
    expiring = AllowedPeer(name="vendor", address=RMM, expires_at=expires_at)
    lasting = AllowedPeer(name="tool", address=TOOL, ports=(TOOL_PORT,), protocol="tcp")
    report = lab.apply(state_dir, lab.signer.sign(_policy(1, "standard", expiring, lasting)))
    assert report["status"] == "applied", report
    targets = (f"{RMM}:{PORT}", f"{TOOL}:{TOOL_PORT}", f"{UNLISTED}:{PORT}")
    assert lab.reach(*targets) == {targets[0]: True, targets[1]: True, targets[2]: False}
    assert datetime.now(UTC) < expires_at, "the apply took too long to see the entry open"
    deadline = time.monotonic() + 60
    while lab.reach(targets[0])[targets[0]]:
        assert time.monotonic() < deadline, "the expired entry is still open"
        time.sleep(0.2)
    closed_at = datetime.now(UTC)
    # Closed at its time (timeouts are whole seconds, rounded down: never late).
    assert expires_at - timedelta(seconds=2) <= closed_at <= expires_at + timedelta(seconds=2)
    assert lab.reach(*targets) == {targets[0]: False, targets[1]: True, targets[2]: False}
    table = lab.table()
    assert table is not None and RMM not in table.split("chain input")[0]
