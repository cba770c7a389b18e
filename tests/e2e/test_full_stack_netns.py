"""The whole system for real: Kafka, Redis, the three services as processes, and the reference
agent inside a network namespace enforcing with nftables.

Topology (addresses from the 198.18.0.0/15 benchmarking range; the RMM's from the
documentation range, as the settings service refuses benchmarking addresses in an allowlist):

    root namespace (Kafka, Redis, services)          ns `host` (agent, listener :9000)
    enforcer on 198.18.1.1  ── veth ──────────────── 198.18.1.2
                                                      198.18.0.1 ── veth ── ns `peer`
                                                                 RMM 203.0.113.20, unlisted 198.18.0.30
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.auth import mint_token
from shared.config import DEV_ENROLLMENT_SECRET, DEV_JWT_SECRET
from shared.enrollment import enrollment_key
from shared.infra.proc import free_port
from shared.topics import Topics
from tests.helpers import ServiceProcess, wait_for
from tests.netns import (
    HOST_IP,
    PEER_IP,
    PEER_PORT,
    PLATFORM_ROOT,
    UNLISTED,
    PlatformLab,
    platform_lab,
    probe,
    read_line,
    requires_netns,
    session_send,
)

ROOT = Path(__file__).resolve().parents[2]
RMM = "203.0.113.20"
RESOLVER = "198.18.0.53"
LISTENER_PORT = 9000
ACCOUNT = "acct-netns"
SOC = {"Authorization": f"Bearer {mint_token(DEV_JWT_SECRET, sub='soc-e2e', role='soc')}"}


pytestmark = requires_netns


class Lab(PlatformLab):
    """The platform lab plus a listener in ``host`` for the inbound checks."""

    def __init__(self) -> None:
        super().__init__("f", RMM)

    def setup(self) -> None:
        super().setup()
        self.serve(self.host, LISTENER_PORT)

    def inbound_from(self, source: str) -> bool:
        target = f"{HOST_IP}:{LISTENER_PORT}"
        return probe(self.peer, target, source=source)[target]

    def open_inbound_session(self, source: str) -> subprocess.Popen[str]:
        proc = self.spawn(
            self.ns_python(
                self.peer, "-m", "tests.e2e.agent.netprobe", "session", "--source", source,
                f"{HOST_IP}:{LISTENER_PORT}",
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert read_line(proc, 15) == "connected"
        return proc

    session_send = staticmethod(session_send)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with platform_lab(Lab()) as net:
        yield net


@pytest.fixture
async def stack(
    service_env: dict[str, str], topics: Topics, tmp_path: Path, lab: Lab
) -> AsyncIterator[dict[str, ServiceProcess]]:
    ports = {name: free_port() for name in ("settings", "isolation", "enforcer")}
    env = dict(
        service_env,
        HOSTISO_PLATFORM_ADDRESSES=PLATFORM_ROOT,
        HOSTISO_SETTINGS_URL=f"http://127.0.0.1:{ports['settings']}",
        HOSTISO_ISOLATION_URL=f"http://127.0.0.1:{ports['isolation']}",
        HOSTISO_LOG_JSON="1",
    )
    services = {
        "settings": ServiceProcess(
            "services.settings", env, ports["settings"], tmp_path / "settings.log"
        ),
        "isolation": ServiceProcess(
            "services.isolation", env, ports["isolation"], tmp_path / "isolation.log"
        ),
        # The agent reaches the enforcer over the veth: it listens on the platform address.
        "enforcer": ServiceProcess(
            "services.enforcer",
            env,
            ports["enforcer"],
            tmp_path / "enforcer.log",
            host=PLATFORM_ROOT,
        ),
    }
    try:
        for proc in services.values():
            proc.start()
        for proc in services.values():
            await proc.wait_ready(timeout=90)
        yield services
    finally:
        for proc in services.values():
            proc.stop()


async def start_agent(
    lab: Lab,
    http: httpx.AsyncClient,
    enforcer: ServiceProcess,
    isolation: ServiceProcess,
    tmp_path: Path,
    *,
    hostname: str,
) -> str:
    """A real agent in the lab's host namespace (state in ``tmp_path/agent-state``), enrolled
    and known to the isolation service; the lab stops it. Returns its endpoint id."""
    state_dir = tmp_path / "agent-state"
    agent = lab.spawn(
        lab.ns_python(
            lab.host, "-m", "agent",
            "--enforcer-url", enforcer.url, "--account-id", ACCOUNT,
            "--dev", "--enrollment-key", enrollment_key(DEV_ENROLLMENT_SECRET, ACCOUNT),
            "--hostname", hostname, "--state-dir", str(state_dir),
            "--platform-addresses", PLATFORM_ROOT, "--dns-resolvers", RESOLVER,
            "--negative-probe", f"{UNLISTED}:{PEER_PORT}", "--poll-wait", "10",
            "--usage-interval", "1",
        ),
        stdout=open(tmp_path / "agent.log", "w"),  # noqa: ASYNC230, SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )  # fmt: skip

    def enrolled_id() -> str | None:
        path = state_dir / "agent-state.json"
        if agent.poll() is not None:
            raise AssertionError((tmp_path / "agent.log").read_text()[-3000:])
        return json.loads(path.read_text()).get("agent_id") if path.exists() else None

    endpoint_id: str = await wait_for(enrolled_id, timeout=30, message="agent enrolled")
    view_url = f"{isolation.url}/v1/endpoints/{endpoint_id}/isolation"

    async def known_to_isolation() -> bool:
        return (await http.get(view_url, headers=SOC)).status_code == 200

    await wait_for(known_to_isolation, timeout=30, message="endpoint registered with isolation")
    return endpoint_id


async def test_isolation_enforced_by_nftables_end_to_end(
    stack: dict[str, ServiceProcess], lab: Lab, tmp_path: Path
) -> None:
    settings, isolation, enforcer = stack["settings"], stack["isolation"], stack["enforcer"]
    async with httpx.AsyncClient(timeout=15) as http:
        allowlist = f"{settings.url}/v1/accounts/{ACCOUNT}/tooling-allowlist"
        added = await http.post(
            f"{allowlist}/entries", json={"name": "Self-hosted RMM", "address": RMM}, headers=SOC
        )
        assert added.status_code == 201, added.text
        enabled = await http.patch(allowlist, json={"enabled": True}, headers=SOC)
        assert enabled.status_code == 200, enabled.text

        endpoint_id = await start_agent(
            lab, http, enforcer, isolation, tmp_path, hostname="netns-host"
        )
        view_url = f"{isolation.url}/v1/endpoints/{endpoint_id}/isolation"
        before = lab.reachability(enforcer.port)
        assert before == {"platform": True, "rmm": True, "unlisted": True}
        session = lab.open_inbound_session(RMM)
        assert lab.session_send(session) == "echo"

        seen_states: list[str] = []

        async def settled(mode: str) -> dict[str, Any] | None:
            view: dict[str, Any] = (await http.get(view_url, headers=SOC)).json()
            if not seen_states or seen_states[-1] != view["state"]:
                seen_states.append(view["state"])
            if view["state"] == "failed":
                raise AssertionError(f"agent reported failure: {view}")
            done = view["mode"] == mode and view["desired_sequence"] == view["applied_sequence"]
            return view if done and view["state"] in ("isolated", "not_isolated") else None

        # Standard isolation: the frozen allowlist lets the RMM through, nothing else.
        response = await http.post(
            view_url, json={"mode": "standard", "reason": "e2e"}, headers=SOC
        )
        assert response.status_code == 202, response.text
        view = await wait_for(lambda: settled("standard"), timeout=60, message="standard applied")
        assert view["state"] == "isolated"
        # The agent's negative probe alone takes about a second, so polling sees the pending state.
        assert seen_states[-2:] == ["isolation_pending", "isolated"], seen_states
        assert [p["address"] for p in view["policy"]["allowed_outbound"]] == [RMM]
        state = json.loads((tmp_path / "agent-state" / "agent-state.json").read_text())
        assert (
            view["rules_sha256"] == state["last_rules_sha256"] and len(view["rules_sha256"]) == 64
        )
        assert lab.table_exists()
        assert lab.reachability(enforcer.port) == {"platform": True, "rmm": True, "unlisted": False}
        assert not lab.inbound_from(RMM), "inbound from the allowlisted address must be blocked"
        assert not lab.inbound_from(PEER_IP)
        assert lab.session_send(session).startswith("cut"), (
            "a session opened inbound before isolation survived"
        )

        # The allowlist usage counters: the agent counted the RMM traffic the allowlist let
        # through and reported it; the isolation status carries it for the policy in force.
        async def rmm_used() -> dict[str, Any] | None:
            usage = (await http.get(view_url, headers=SOC)).json().get("allowlist_usage") or []
            used = [u for u in usage if u["address"] == RMM and u["packets"] > 0]
            return used[0] if used else None

        counted = await wait_for(rmm_used, timeout=30, message="RMM usage counted and reported")
        assert counted["bytes"] > 0 and counted["last_seen"]

        # A settings change does not touch the isolated endpoint (frozen snapshot).
        disabled = await http.patch(allowlist, json={"enabled": False}, headers=SOC)
        assert disabled.status_code == 200, disabled.text
        again = (await http.get(view_url, headers=SOC)).json()
        assert again["desired_sequence"] == view["desired_sequence"]
        assert lab.reachability(enforcer.port)["rmm"] is True

        # Strict: platform only.
        response = await http.post(
            view_url, json={"mode": "strict", "reason": "rmm suspect"}, headers=SOC
        )
        assert response.status_code == 202, response.text
        view = await wait_for(lambda: settled("strict"), timeout=60, message="strict applied")
        assert view["policy"]["allowed_outbound"] == []
        assert lab.reachability(enforcer.port) == {
            "platform": True,
            "rmm": False,
            "unlisted": False,
        }

        # Release: everything open again, our table gone.
        response = await http.request(
            "DELETE", view_url, json={"reason": "incident closed"}, headers=SOC
        )
        assert response.status_code == 202, response.text
        view = await wait_for(lambda: settled("none"), timeout=60, message="release applied")
        assert view["state"] == "not_isolated"
        assert not lab.table_exists()
        assert lab.reachability(enforcer.port) == {"platform": True, "rmm": True, "unlisted": True}
        assert lab.inbound_from(RMM)


RELAY = "203.0.113.21"


def add_peer_address(lab: Lab, address: str) -> None:
    """One more server address in ``peer`` (its listener on :8080 answers on every address)."""
    for command in (
        ["ip", "-n", lab.peer, "addr", "add", f"{address}/24", "dev", f"hi{lab.tag}p{lab.suffix}"],
        ["ip", "-n", lab.host, "route", "add", f"{address}/32", "dev", f"hi{lab.tag}h{lab.suffix}"],
    ):
        subprocess.run(command, check=True, capture_output=True)


def reach(lab: Lab, *addresses: str) -> dict[str, bool]:
    targets = {a: f"{a}:{PEER_PORT}" for a in addresses}
    got = probe(lab.host, *targets.values())
    return {a: got[t] for a, t in targets.items()}


async def add_published(http: httpx.AsyncClient, allowlist: str, name: str, address: str) -> str:
    """Add an entry (and switch the allowlist on) once its event is in Kafka.

    On a loaded machine the relay's first transaction may outlast the write's deadline (503:
    saved, not yet published); a repeated switch-on answers 200 once the latest version is out.
    """
    added = await http.post(
        f"{allowlist}/entries", json={"name": name, "address": address}, headers=SOC
    )
    assert added.status_code in (201, 503), added.text

    async def switched_on_and_published() -> bool:
        response = await http.patch(allowlist, json={"enabled": True}, headers=SOC)
        assert response.status_code in (200, 503), response.text
        return response.status_code == 200

    await wait_for(switched_on_and_published, timeout=90, message="allowlist published")
    entries = (await http.get(allowlist, headers=SOC)).json()["entries"]
    return str(next(e["id"] for e in entries if e["address"] == address))


async def test_refresh_opens_a_new_entry_and_revoke_cuts_the_rmm_without_a_release(
    stack: dict[str, ServiceProcess], lab: Lab, tmp_path: Path
) -> None:
    settings, isolation, enforcer = stack["settings"], stack["isolation"], stack["enforcer"]
    add_peer_address(lab, RELAY)
    async with httpx.AsyncClient(timeout=15) as http:
        allowlist = f"{settings.url}/v1/accounts/{ACCOUNT}/tooling-allowlist"
        rmm_id = await add_published(http, allowlist, "Self-hosted RMM", RMM)

        endpoint_id = await start_agent(
            lab, http, enforcer, isolation, tmp_path, hostname="netns-fleet"
        )
        view_url = f"{isolation.url}/v1/endpoints/{endpoint_id}/isolation"
        seen_states: list[str] = []

        async def applied(sequence: int) -> dict[str, Any] | None:
            view: dict[str, Any] = (await http.get(view_url, headers=SOC)).json()
            seen_states.append(view["state"])
            if view["state"] == "failed":
                raise AssertionError(f"agent reported failure: {view}")
            done = view["state"] == "isolated" and view["applied_sequence"] == sequence
            return view if done else None

        assert reach(lab, RMM, RELAY) == {RMM: True, RELAY: True}, "the lab's paths work"

        async def snapshot_would_hold_the_rmm() -> bool:
            # A read_committed end offset can trail the relay's just-committed transaction.
            preview = (await http.get(f"{view_url}/preview", headers=SOC)).json()
            return [p["address"] for p in preview["policy"]["allowed_outbound"]] == [RMM]

        await wait_for(snapshot_would_hold_the_rmm, timeout=30, message="replica has the RMM")
        isolate = await http.post(view_url, json={"mode": "standard", "reason": "e2e"}, headers=SOC)
        assert isolate.status_code == 202, isolate.text
        await wait_for(lambda: applied(1), timeout=60, message="standard applied")
        assert reach(lab, RMM, RELAY, UNLISTED) == {RMM: True, RELAY: False, UNLISTED: False}

        # A new entry: frozen out of the isolation in force until it is refreshed.
        await add_published(http, allowlist, "RMM relay", RELAY)
        assert reach(lab, RELAY)[RELAY] is False

        async def diff_adds_the_relay() -> bool:
            preview = (await http.get(f"{view_url}/preview", headers=SOC)).json()
            return [p["address"] for p in preview["diff"]["added"]] == [RELAY]

        await wait_for(diff_adds_the_relay, timeout=30, message="preview offers the relay")
        seen_states.clear()
        refresh = await http.post(f"{view_url}/refresh", json={"reason": "relay"}, headers=SOC)
        assert refresh.status_code == 202, refresh.text
        view = await wait_for(lambda: applied(2), timeout=60, message="refresh applied")
        assert [p["address"] for p in view["policy"]["allowed_outbound"]] == [RMM, RELAY]
        # Never released in between: no state outside isolation was ever observed.
        assert set(seen_states) <= {"isolated", "isolation_pending"}, seen_states
        assert reach(lab, RMM, RELAY, UNLISTED) == {RMM: True, RELAY: True, UNLISTED: False}

        # The RMM is compromised: revoke cuts it from the isolated host, the relay stays open.
        seen_states.clear()
        revoke = await http.post(
            f"{allowlist}/entries/{rmm_id}/revoke", json={"reason": "RMM compromised"}, headers=SOC
        )
        assert revoke.status_code == 202, revoke.text
        assert revoke.json()["endpoints"] == 1
        view = await wait_for(lambda: applied(3), timeout=60, message="revoke applied")
        assert [p["address"] for p in view["policy"]["allowed_outbound"]] == [RELAY]
        assert view["mode"] == "standard"
        assert set(seen_states) <= {"isolated", "isolation_pending"}, seen_states
        assert reach(lab, RMM, RELAY, UNLISTED) == {RMM: False, RELAY: True, UNLISTED: False}
