"""Other platform services learn every state change from isolation.events.v1, without polling."""

from __future__ import annotations

import pytest

from shared.messages import IsolateEndpoint, IsolationStateChanged
from tests.helpers import read_topic, wait_for
from tests.integration.isolation.conftest import SOC, Harness

pytestmark = pytest.mark.integration


async def test_pending_applied_and_failed_are_published_as_full_state(h: Harness) -> None:
    await h.register("ep-ev-1", "acct-ev")
    await h.register("ep-ev-2", "acct-ev")
    first = IsolateEndpoint(endpoint_id="ep-ev-1", mode="standard", requested_by=SOC)
    await h.send(h.topics.isolation_requests, "ep-ev-1", first)
    await h.send(
        h.topics.isolation_requests,
        "ep-ev-2",
        IsolateEndpoint(endpoint_id="ep-ev-2", mode="strict", requested_by=SOC),
    )
    commands = await h.all_commands(expect=2)
    by_endpoint = {c.policy.endpoint_id: c.policy for c in commands}
    await h.report(by_endpoint["ep-ev-1"])
    await h.report(by_endpoint["ep-ev-2"], status="failed", detail="nft: permission denied")

    async def final_states() -> dict[str, IsolationStateChanged] | None:
        events: list[IsolationStateChanged] = await read_topic(
            h.bootstrap, h.topics, h.topics.isolation_events
        )
        newest = {e.endpoint_id: e for e in events}
        done = {"ep-ev-1": "isolated", "ep-ev-2": "failed"}
        if all(newest.get(k) and newest[k].state == v for k, v in done.items()):
            return newest
        return None

    newest = await wait_for(final_states, timeout=30, message="applied and failed events")
    applied, failed = newest["ep-ev-1"], newest["ep-ev-2"]
    assert applied.request_ids == (first.request_id,)
    assert applied.rules_sha256 == "d" * 64 and applied.sequence == 1
    assert applied.policy_id == by_endpoint["ep-ev-1"].policy_id
    assert (failed.mode, failed.detail) == ("strict", "nft: permission denied")
    events = await read_topic(h.bootstrap, h.topics, h.topics.isolation_events)
    assert next(e.state for e in events if e.endpoint_id == "ep-ev-1") == "isolation_pending"
