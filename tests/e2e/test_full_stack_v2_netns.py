"""Allowlist v2 through the whole system (issue 12): entries added on the real settings API
(an IPv6 RMM, a tool limited to TCP 8041, a vendor entry expiring during the test), frozen by
the isolation service, signed by the enforcer and enforced by the reference agent with real
nftables rules in a network namespace.

Standard isolation: the IPv6 RMM is reachable, the tool on 8041 and not on 22, the vendor until
its ``expires_at`` and not after (no new policy is issued for that). Strict: none of them.
The lab and the stack are the ones of test_full_stack_netns.py, plus IPv6 on the host link.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.topics import Topics
from tests.e2e.test_full_stack_netns import ACCOUNT, RMM, SOC, Lab, start_agent
from tests.e2e.test_full_stack_netns import stack as _stack_fixture
from tests.helpers import ServiceProcess, wait_for
from tests.netns import PEER_PORT, platform_lab, probe, requires_netns

pytestmark = requires_netns

HOST6, RMM6, UNLISTED6 = "2001:db8:200::1", "2001:db8:200::20", "2001:db8:200::30"
TOOL, TOOL_PORT, SSH = "203.0.113.40", 8041, 22
VENDOR = "203.0.113.50"
VENDOR_LIFETIME = timedelta(seconds=45)


class V2Lab(Lab):
    def setup(self) -> None:
        super().setup()
        host_if, peer_if = f"hi{self.tag}h{self.suffix}", f"hi{self.tag}p{self.suffix}"
        run = self._run
        run("ip", "-n", self.host, "addr", "add", f"{HOST6}/64", "dev", host_if, "nodad")
        for address in (RMM6, UNLISTED6):
            run("ip", "-n", self.peer, "addr", "add", f"{address}/64", "dev", peer_if, "nodad")
        for address in (TOOL, VENDOR):
            run("ip", "-n", self.peer, "addr", "add", f"{address}/32", "dev", peer_if)
            run("ip", "-n", self.host, "route", "add", f"{address}/32", "dev", host_if)
        self.serve(self.peer, TOOL_PORT)
        self.serve(self.peer, SSH)

    @staticmethod
    def _run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)

    def reach(self, *targets: str) -> dict[str, bool]:
        return probe(self.host, *targets)


@pytest.fixture
def lab() -> Iterator[V2Lab]:
    with platform_lab(V2Lab()) as net:
        yield net


stack = _stack_fixture

SIX = (f"[{RMM6}]:{PEER_PORT}", f"[{UNLISTED6}]:{PEER_PORT}")
TOOLS = (f"{TOOL}:{TOOL_PORT}", f"{TOOL}:{SSH}")
VENDOR_T = f"{VENDOR}:{PEER_PORT}"


async def test_v2_entries_enforced_end_to_end(
    stack: dict[str, ServiceProcess], lab: V2Lab, tmp_path: Path, topics: Topics
) -> None:
    settings, isolation, enforcer = stack["settings"], stack["isolation"], stack["enforcer"]
    assert lab.reach(*SIX, *TOOLS, VENDOR_T) == dict.fromkeys((*SIX, *TOOLS, VENDOR_T), True)
    async with httpx.AsyncClient(timeout=15) as http:
        allowlist = f"{settings.url}/v1/accounts/{ACCOUNT}/tooling-allowlist"
        for body in (
            {"name": "RMM", "address": RMM},
            {"name": "RMM v6", "address": "2001:DB8:200:0::20"},
            {"name": "Tool", "address": TOOL, "ports": [TOOL_PORT], "protocol": "tcp"},
        ):
            added = await http.post(f"{allowlist}/entries", json=body, headers=SOC)
            assert added.status_code == 201, added.text
        enabled = await http.patch(allowlist, json={"enabled": True}, headers=SOC)
        assert enabled.status_code == 200, enabled.text

        endpoint_id = await start_agent(
            lab, http, enforcer, isolation, tmp_path, hostname="netns-v2"
        )
        view_url = f"{isolation.url}/v1/endpoints/{endpoint_id}/isolation"

        async def settled(mode: str) -> dict[str, Any] | None:
            view: dict[str, Any] = (await http.get(view_url, headers=SOC)).json()
            if view["state"] == "failed":
                raise AssertionError(f"agent reported failure: {view}")
            done = view["mode"] == mode and view["desired_sequence"] == view["applied_sequence"]
            return view if done and view["state"] in ("isolated", "not_isolated") else None

        # The vendor entry is added last, right before isolating, so it expires mid-test.
        expires_at = datetime.now(UTC) + VENDOR_LIFETIME
        vendor = await http.post(
            f"{allowlist}/entries",
            json={"name": "Vendor", "address": VENDOR, "expires_at": expires_at.isoformat()},
            headers=SOC,
        )
        assert vendor.status_code == 201, vendor.text
        response = await http.post(view_url, json={"mode": "standard", "reason": "v2"}, headers=SOC)
        assert response.status_code == 202, response.text
        view = await wait_for(lambda: settled("standard"), timeout=60, message="standard applied")
        peers = {p["address"]: p for p in view["policy"]["allowed_outbound"]}
        assert set(peers) == {RMM, "2001:db8:200::20", TOOL, VENDOR}
        assert (peers[TOOL]["ports"], peers[TOOL]["protocol"]) == ([TOOL_PORT], "tcp")
        assert peers[VENDOR]["expires_at"] is not None
        assert datetime.now(UTC) < expires_at - timedelta(seconds=5), "too slow to see it open"
        assert lab.reach(*SIX, *TOOLS, VENDOR_T) == {
            SIX[0]: True,
            SIX[1]: False,
            TOOLS[0]: True,
            TOOLS[1]: False,
            VENDOR_T: True,
        }
        sequence = view["desired_sequence"]

        # The vendor entry closes at its time on the agent alone: no new policy.
        deadline = expires_at + timedelta(seconds=30)
        while lab.reach(VENDOR_T)[VENDOR_T]:
            assert datetime.now(UTC) < deadline, "the expired entry is still open"
            await asyncio.sleep(0.5)
        assert datetime.now(UTC) >= expires_at - timedelta(seconds=2), "closed too early"
        view = (await http.get(view_url, headers=SOC)).json()
        assert view["desired_sequence"] == sequence
        assert lab.reach(SIX[0], TOOLS[0]) == {SIX[0]: True, TOOLS[0]: True}

        # Strict: platform only, IPv6 RMM and the tool included.
        response = await http.post(view_url, json={"mode": "strict", "reason": "v2"}, headers=SOC)
        assert response.status_code == 202, response.text
        view = await wait_for(lambda: settled("strict"), timeout=60, message="strict applied")
        assert view["policy"]["allowed_outbound"] == []
        assert lab.reach(*SIX, *TOOLS) == dict.fromkeys((*SIX, *TOOLS), False)
        assert lab.reachability(enforcer.port)["platform"]
