"""Replicas (newer version wins, rebuild from the topics) and guarantee 6 across the two lanes."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from shared.messages import Actor, IsolateEndpoint, ReleaseEndpoint
from tests.helpers import read_topic, wait_for
from tests.integration.isolation.conftest import Harness, running_isolation

SOC = Actor(sub="soc", role="soc")


async def preview_addresses(h: Harness, endpoint_id: str, http: object = None) -> list[str]:
    client = http or h.http
    response = await client.get(  # type: ignore[attr-defined]
        f"/v1/endpoints/{endpoint_id}/isolation/preview", headers=h.token()
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return [p["address"] for p in body["policy"]["allowed_outbound"]]


async def test_settings_replica_applies_only_a_newer_version(h: Harness) -> None:
    await h.register("ep-v", "acct-v")
    older = h.allowlist_event("acct-v", ["203.0.113.1"])
    newer = h.allowlist_event("acct-v", ["203.0.113.2"])
    await h.send(h.topics.settings_allowlist, "acct-v", newer)
    await h.send(h.topics.settings_allowlist, "acct-v", older)  # reordered / redelivered
    await h.send(h.topics.settings_allowlist, "acct-v", newer)
    assert await preview_addresses(h, "ep-v") == ["203.0.113.2"]
    # An event whose key is not its account cannot poison another account's replica.
    wrong = h.allowlist_event("acct-v", ["203.0.113.66"])
    await h.send(h.topics.settings_allowlist, "acct-other", wrong)
    (dead,) = await read_topic(h.bootstrap, h.topics, h.topics.dlq, expect=1)
    assert "differs from account_id" in dead.reason
    assert await preview_addresses(h, "ep-v") == ["203.0.113.2"]


async def test_a_new_instance_rebuilds_both_replicas_from_the_compacted_topics(
    h: Harness, kafka_bootstrap: str, redis_url: str, unique_suffix: str
) -> None:
    await h.register("ep-rb", "acct-rb")
    await h.set_allowlist("acct-rb", ["203.0.113.9"])
    await h.set_allowlist("acct-rb", ["203.0.113.9", "203.0.113.10"])
    async with running_isolation(
        kafka_bootstrap, redis_url, h.topics, f"fresh{unique_suffix}:"
    ) as (_, http):
        assert await preview_addresses(h, "ep-rb", http) == ["203.0.113.9", "203.0.113.10"]


async def test_sequences_strictly_increase_when_both_lanes_touch_one_endpoint(h: Harness) -> None:
    endpoints = [f"ep-o{i}" for i in range(10)]
    await asyncio.gather(*(h.register(e, "acct-o") for e in endpoints))
    await h.set_allowlist("acct-o", ["203.0.113.5"])
    sends = []
    for endpoint in endpoints:
        for _ in range(3):
            sends.append(
                h.send(
                    h.topics.isolation_requests,
                    endpoint,
                    IsolateEndpoint(endpoint_id=endpoint, mode="standard", requested_by=SOC),
                )
            )
            sends.append(
                h.send(
                    h.topics.isolation_requests_priority,
                    endpoint,
                    IsolateEndpoint(endpoint_id=endpoint, mode="strict", requested_by=SOC),
                )
            )
            sends.append(
                h.send(
                    h.topics.isolation_requests,
                    endpoint,
                    ReleaseEndpoint(endpoint_id=endpoint, requested_by=SOC),
                )
            )
    await asyncio.gather(*sends)
    await h.wait_processed("requests", 60)
    await h.wait_processed("requests-priority", 30)
    commands = await h.commands() + await h.commands(priority=True)
    by_endpoint: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for command in commands:
        by_endpoint[command.policy.endpoint_id][command.policy.sequence].add(
            command.policy.policy_id
        )
    for endpoint in endpoints:
        sequences = by_endpoint[endpoint]
        # No gap, no sequence issued twice with different policies, whatever the interleaving.
        assert sorted(sequences) == list(range(1, len(sequences) + 1)), endpoint
        assert all(len(ids) == 1 for ids in sequences.values()), endpoint
        state = await h.state(endpoint)
        assert state["desired_sequence"] == len(sequences)


async def test_strict_request_overtakes_a_backlog_of_normal_requests(h: Harness) -> None:
    endpoints = [f"ep-bk{i}" for i in range(100)]
    await asyncio.gather(*(h.register(e, "acct-bk") for e in [*endpoints, "ep-urgent"]))
    # The normal lane drains a backlog quickly now: hold it, so the backlog is certainly there
    # when the strict request arrives (one shared lane would hold the strict request too).
    normal = next(c for c in h.app.state.runtime.consumers if c.name == "requests")
    gate = asyncio.Event()
    # The lane's strategy holds the (decoding) record handler the loop runs.
    handle = normal.strategy._handler

    async def held(record: object) -> None:
        await gate.wait()
        await handle(record)

    normal.strategy._handler = held
    backlog = []
    for round_ in range(4):
        for endpoint in endpoints:
            message = (
                IsolateEndpoint(endpoint_id=endpoint, mode="standard", requested_by=SOC)
                if round_ % 2 == 0
                else ReleaseEndpoint(endpoint_id=endpoint, requested_by=SOC)
            )
            backlog.append(
                await h.producer.send(
                    h.topics.isolation_requests, message.to_bytes(), key=endpoint.encode()
                )
            )
    await asyncio.gather(*backlog)
    try:
        response = await h.http.post(
            "/v1/endpoints/ep-urgent/isolation", json={"mode": "strict"}, headers=h.token()
        )
        assert response.status_code == 202
        await wait_for(
            lambda: h.processed("requests-priority") >= 1, timeout=30, message="strict request"
        )
        (strict,) = await h.commands(expect=1, priority=True)
        assert strict.policy.endpoint_id == "ep-urgent"
        # The strict request was applied while the normal lane still held its whole backlog.
        assert h.processed("requests") == 0
    finally:
        gate.set()
    await h.wait_processed("requests", len(backlog))
    assert len(await h.commands(expect=len(backlog))) == len(backlog)
