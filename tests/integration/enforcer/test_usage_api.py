"""POST /v1/agents/{id}/usage on the real Kafka and Redis: 202 published, 409, 401, 422."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from agent.client import AgentRejectedError, EnforcerClient, Enrollment, UsageRefusedError
from services.enforcer.domain import NORMAL_LANE
from shared.messages import AllowlistUsageReported
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.enforcer.conftest import enroll, policy_command, send_command

Running = tuple[FastAPI, httpx.AsyncClient]

COUNTER = {
    "address": "203.0.113.10",
    "ports": [8041],
    "protocol": "tcp",
    "packets": 7,
    "bytes": 840,
    "last_seen": "2026-12-01T12:00:00Z",
}


async def test_usage_of_the_held_sequence_is_accepted_and_published_keyed_by_endpoint(
    enforcer: Running, producer: Any, topics: Topics, kafka_bootstrap: str
) -> None:
    app, http = enforcer
    agent = await enroll(http)
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 1))
    lane = app.state.lanes[NORMAL_LANE]
    await wait_for(lambda: lane.processed >= 1, message="policy stored")
    url = f"/v1/agents/{agent.agent_id}/usage"
    accepted = await http.post(url, headers=agent.auth, json={"sequence": 1, "counters": [COUNTER]})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"endpoint_id": agent.agent_id, "sequence": 1, "counters": 1}
    published = await read_topic(kafka_bootstrap, topics, topics.isolation_status, expect=1)
    assert len(published) == 1 and isinstance(published[0], AllowlistUsageReported)
    usage = published[0]
    assert (usage.endpoint_id, usage.sequence) == (agent.agent_id, 1)
    assert [(c.address, c.ports, c.protocol, c.packets, c.bytes) for c in usage.counters] == [
        ("203.0.113.10", (8041,), "tcp", 7, 840)
    ]

    # A sequence other than the held policy's is refused: counts never mix across policies.
    stale = await http.post(url, headers=agent.auth, json={"sequence": 2, "counters": []})
    assert stale.status_code == 409
    assert stale.headers["content-type"] == "application/problem+json"
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 2))
    await wait_for(lambda: lane.processed >= 2, message="second policy stored")
    superseded = await http.post(url, headers=agent.auth, json={"sequence": 1, "counters": []})
    assert superseded.status_code == 409 and "held: 2" in superseded.json()["detail"]


async def test_usage_before_any_policy_is_refused_with_409(enforcer: Running) -> None:
    _, http = enforcer
    agent = await enroll(http)
    none_held = await http.post(
        f"/v1/agents/{agent.agent_id}/usage",
        headers=agent.auth,
        json={"sequence": 1, "counters": []},
    )
    assert none_held.status_code == 409


async def test_usage_needs_the_agents_own_token(enforcer: Running) -> None:
    _, http = enforcer
    a, b = await enroll(http), await enroll(http)
    body = {"sequence": 1, "counters": []}
    assert (await http.post(f"/v1/agents/{a.agent_id}/usage", json=body)).status_code == 401
    foreign = await http.post(f"/v1/agents/{b.agent_id}/usage", headers=a.auth, json=body)
    assert foreign.status_code == 401


async def test_bad_usage_bodies_get_422_naming_the_field_and_rule(enforcer: Running) -> None:
    _, http = enforcer
    agent = await enroll(http)
    url = f"/v1/agents/{agent.agent_id}/usage"

    async def problem(body: dict[str, Any]) -> set[tuple[str, str]]:
        response = await http.post(url, headers=agent.auth, json=body)
        assert response.status_code == 422, response.text
        return {(e["field"], e["rule"]) for e in response.json()["errors"]}

    too_many = await problem({"sequence": 1, "counters": [COUNTER] * 101})
    assert [field for field, _ in too_many] == ["body.counters"]
    negative = await problem({"sequence": 1, "counters": [{**COUNTER, "packets": -1}]})
    assert {field for field, _ in negative} == {"body.counters.0.packets"}
    bad_port = await problem({"sequence": 1, "counters": [{**COUNTER, "ports": [0]}]})
    assert {field for field, _ in bad_port} == {"body.counters.0.ports.0"}
    bad_protocol = await problem({"sequence": 1, "counters": [{**COUNTER, "protocol": "icmp"}]})
    assert {field for field, _ in bad_protocol} == {"body.counters.0.protocol"}
    no_sequence = await problem({"counters": []})
    assert {field for field, _ in no_sequence} == {"body.sequence"}
    extra = await problem({"sequence": 1, "counters": [], "agent": "x"})
    assert {field for field, _ in extra} == {"body.agent"}
    naive_time = await problem(
        {"sequence": 1, "counters": [{**COUNTER, "last_seen": "2026-12-01T12:00:00"}]}
    )
    assert {field for field, _ in naive_time} == {"body.counters.0.last_seen"}
    for _, rule in too_many | negative | bad_port | bad_protocol | no_sequence | extra:
        assert rule


async def test_the_agents_client_reports_usage_and_hears_409_for_a_stale_sequence(
    enforcer: Running, producer: Any, topics: Topics
) -> None:
    app, http = enforcer
    agent = await enroll(http)
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 1))
    lane = app.state.lanes[NORMAL_LANE]
    await wait_for(lambda: lane.processed >= 1, message="policy stored")
    client = EnforcerClient(str(http.base_url), http, allow_plain_http=True)
    enrollment = Enrollment(agent.agent_id, agent.token)
    await client.report_usage(enrollment, {"sequence": 1, "counters": [COUNTER]})
    with pytest.raises(UsageRefusedError) as refused:
        await client.report_usage(enrollment, {"sequence": 2, "counters": []})
    assert refused.value.status == 409
    with pytest.raises(AgentRejectedError):
        await client.report_usage(
            Enrollment(agent.agent_id, "forged"), {"sequence": 1, "counters": []}
        )
