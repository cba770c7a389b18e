"""Allowlist usage on the real Kafka and Redis: accumulated per sequence, exposed, never mixed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.messages import AllowlistUsage, AllowlistUsageReported, IsolateEndpoint
from tests.helpers import read_topic
from tests.integration.isolation.conftest import Harness
from tests.samples import PARTNER

pytestmark = pytest.mark.integration

SEEN = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _usage(
    sequence: int, packets: int, size: int, *, endpoint: str = "ep-u"
) -> AllowlistUsageReported:
    return AllowlistUsageReported(
        endpoint_id=endpoint,
        account_id="acct-1",
        sequence=sequence,
        counters=(
            AllowlistUsage(
                address="203.0.113.10",
                protocol="any",
                packets=packets,
                bytes=size,
                last_seen=SEEN,
            ),
        ),
    )


async def test_usage_is_accumulated_for_the_policy_in_force_and_superseded_counts_never_mix(
    h: Harness,
) -> None:
    await h.register("ep-u", "acct-1")
    await h.set_allowlist("acct-1", ["203.0.113.10"])
    await h.send(
        h.topics.isolation_requests,
        "ep-u",
        IsolateEndpoint(endpoint_id="ep-u", mode="standard", requested_by=PARTNER),
    )
    (standard,) = await h.commands(expect=1)
    await h.report(standard.policy)
    await h.wait_processed("status", 1)
    state = await h.state("ep-u")
    assert (state["state"], state["allowlist_usage"]) == ("isolated", [])

    first = _usage(1, 3, 180)
    await h.send(h.topics.isolation_status, "ep-u", first)
    await h.send(h.topics.isolation_status, "ep-u", first)  # redelivered: counted once
    await h.send(h.topics.isolation_status, "ep-u", _usage(1, 2, 120))
    await h.wait_processed("status", 4)
    usage = (await h.state("ep-u"))["allowlist_usage"]
    assert usage == [
        {
            "address": "203.0.113.10",
            "ports": [],
            "protocol": "any",
            "packets": 5,
            "bytes": 300,
            "last_seen": "2026-12-01T12:00:00Z",
        }
    ]

    # Strict supersedes sequence 1: its counts are no longer the policy in force's.
    await h.send(
        h.topics.isolation_requests_priority,
        "ep-u",
        IsolateEndpoint(endpoint_id="ep-u", mode="strict", requested_by=PARTNER),
    )
    (strict,) = await h.commands(expect=1, priority=True)
    await h.send(h.topics.isolation_status, "ep-u", _usage(1, 50, 5000))  # late, superseded
    await h.report(strict.policy)
    await h.wait_processed("status", 6)
    state = await h.state("ep-u")
    assert (state["applied_sequence"], state["allowlist_usage"]) == (2, [])
    await h.send(h.topics.isolation_status, "ep-u", _usage(2, 1, 60))
    await h.send(h.topics.isolation_status, "ep-u", _usage(1, 50, 5000))  # later still: ignored
    await h.wait_processed("status", 8)
    usage = (await h.state("ep-u"))["allowlist_usage"]
    assert [(u["packets"], u["bytes"]) for u in usage] == [(1, 60)]


async def test_usage_of_an_unknown_endpoint_is_dead_lettered(h: Harness) -> None:
    await h.send(h.topics.isolation_status, "ep-nobody", _usage(1, 1, 1, endpoint="ep-nobody"))
    (dead,) = await read_topic(h.bootstrap, h.topics, h.topics.dlq, expect=1)
    assert "EndpointNotFoundError" in dead.reason
