"""The agent's usage reports: deltas go out, failures are kept and retried, 409 drops them,
and nothing about reporting ever touches the rules in force (fail closed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.client import (
    AgentRejectedError,
    EnforcerClient,
    EnforcerUnavailableError,
    Enrollment,
    UsageRefusedError,
)
from agent.firewall import ApplyOutcome, NftablesError, UsageReading, UsageSource
from agent.loop import AgentIdentity, AgentLoop
from agent.nft import CounterEntry
from agent.state import StateStore
from shared.messages import FrozenPolicy

RMM = CounterEntry("e0", "203.0.113.10", "any", ())


class CountingFirewall:
    """Counts like the nftables firewall; records every apply (there must be none)."""

    def __init__(self) -> None:
        self.reading: UsageReading | None = UsageReading(3, 1, (RMM,), {"e0": (0, 0)})
        self.unreadable = False
        self.applies = 0

    async def apply(self, policy: FrozenPolicy, *, rollback_on_failure: bool) -> ApplyOutcome:
        self.applies += 1
        raise AssertionError("usage reporting must never apply rules")

    async def table_present(self) -> bool:
        return True

    def restore_known(self, ruleset: str | None) -> None:
        return None

    async def read_usage(self) -> UsageReading | None:
        if self.unreadable:
            raise NftablesError("nft: no such table")
        return self.reading

    def count(self, packets: int, size: int) -> None:
        assert self.reading is not None
        self.reading = UsageReading(3, 1, (RMM,), {"e0": (packets, size)})


class UsageClient(EnforcerClient):
    def __init__(self) -> None:
        super().__init__("http://enforcer.test", httpx.AsyncClient(), allow_plain_http=True)
        self.bodies: list[dict[str, Any]] = []
        self.fail_with: Exception | None = None

    async def report_usage(self, enrollment: Enrollment, body: dict[str, Any]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.bodies.append(body)


def _loop(tmp_path: Path, client: UsageClient, firewall: CountingFirewall) -> AgentLoop:
    async def key() -> str:
        return "k"

    loop = AgentLoop(
        identity=AgentIdentity("acct-1", "web-01", "linux"),
        client=client,
        store=StateStore(tmp_path, durable=False),
        firewall=firewall,
        enrollment_key=key,
        stats=AgentStats(),
        dev_mode=True,
        table_check_interval=None,
        usage_interval=60,
    )
    loop.state.agent_id, loop.state.agent_token = "ep-1", "tok"
    return loop


def _packets(body: dict[str, Any]) -> list[int]:
    return [c["packets"] for c in body["counters"]]


def test_the_nftables_firewall_is_a_usage_source_and_the_simulated_one_is_not() -> None:
    from agent.firewall import NftablesFirewall, SimulatedFirewall

    facts = HostFacts(platform_addresses=(), dns_resolvers=())
    nft = NftablesFirewall(facts, "hostiso", platform_probe=None, negative_probe=None)
    assert isinstance(nft, UsageSource)
    assert not isinstance(SimulatedFirewall(facts, "hostiso"), UsageSource)


async def test_deltas_are_reported_and_an_unchanged_count_sends_nothing(tmp_path: Path) -> None:
    client, firewall = UsageClient(), CountingFirewall()
    loop = _loop(tmp_path, client, firewall)
    assert await loop.report_usage_once(firewall)  # first of the sequence: every entry
    firewall.count(4, 240)
    assert await loop.report_usage_once(firewall)
    assert not await loop.report_usage_once(firewall)
    assert [(b["sequence"], _packets(b)) for b in client.bodies] == [(3, [0]), (3, [4])]


@pytest.mark.parametrize(
    "failure",
    [EnforcerUnavailableError("HTTP 503"), AgentRejectedError("usage: HTTP 401", 401)],
    ids=["unavailable", "rejected"],
)
async def test_a_failed_report_is_kept_and_sent_with_the_next_one(
    tmp_path: Path, failure: Exception
) -> None:
    client, firewall = UsageClient(), CountingFirewall()
    loop = _loop(tmp_path, client, firewall)
    assert await loop.report_usage_once(firewall)
    firewall.count(4, 240)
    client.fail_with = failure
    assert not await loop.report_usage_once(firewall)
    client.fail_with = None
    firewall.count(6, 360)
    assert await loop.report_usage_once(firewall)
    assert _packets(client.bodies[-1]) == [6]
    assert firewall.applies == 0


async def test_a_refused_report_is_dropped_not_resent(tmp_path: Path) -> None:
    client, firewall = UsageClient(), CountingFirewall()
    loop = _loop(tmp_path, client, firewall)
    assert await loop.report_usage_once(firewall)
    firewall.count(4, 240)
    client.fail_with = UsageRefusedError("usage: HTTP 409", 409)
    assert not await loop.report_usage_once(firewall)
    client.fail_with = None
    assert not await loop.report_usage_once(firewall)
    firewall.count(5, 300)
    assert await loop.report_usage_once(firewall)
    assert _packets(client.bodies[-1]) == [1]


async def test_unreadable_counters_or_no_isolation_report_nothing(tmp_path: Path) -> None:
    client, firewall = UsageClient(), CountingFirewall()
    loop = _loop(tmp_path, client, firewall)
    firewall.unreadable = True
    assert not await loop.report_usage_once(firewall)
    firewall.unreadable, firewall.reading = False, None  # released or strict: nothing counted
    assert not await loop.report_usage_once(firewall)
    assert client.bodies == [] and firewall.applies == 0
