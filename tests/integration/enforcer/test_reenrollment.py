"""Re-enrollment on the real Kafka and Redis: the endpoint keeps its id, policy and sequence."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI

from services.enforcer.adapters.redis_store import EnforcerKeys
from shared.config import DEV_ENROLLMENT_SECRET
from shared.enrollment import enrollment_key
from shared.messages import AuditRecorded, EndpointRegistered
from shared.redis import Keys, redis_tls_options
from shared.topics import Topics
from tests.helpers import SECURITY, read_topic, wait_for
from tests.integration.enforcer.conftest import AgentClient, enroll, policy_command, send_command

Running = tuple[FastAPI, httpx.AsyncClient]


async def reenroll(
    http: httpx.AsyncClient, account_id: str, endpoint_id: str, *, key_account: str | None = None
) -> httpx.Response:
    return await http.post(
        "/v1/agents/enroll",
        json={
            "account_id": account_id,
            "enrollment_key": enrollment_key(DEV_ENROLLMENT_SECRET, key_account or account_id),
            "hostname": "web-01",
            "platform": "linux",
            "endpoint_id": endpoint_id,
        },
    )


async def test_reenrollment_with_its_own_id_keeps_the_id_and_policy_and_kills_the_old_token(
    enforcer: Running, producer: object, topics: Topics, kafka_bootstrap: str
) -> None:
    _, http = enforcer
    agent = await enroll(http, "acct-1")
    await send_command(
        producer, topics.enforcer_commands, policy_command(agent.agent_id, 3, mode="strict")
    )

    async def holds_sequence_3() -> bool:
        return (await agent.poll()).headers.get("X-Policy-Sequence") == "3"

    await wait_for(holds_sequence_3, timeout=20)

    response = await reenroll(http, "acct-1", agent.agent_id)
    assert response.status_code == 201, response.text
    assert response.json()["agent_id"] == agent.agent_id
    again = AgentClient(http, agent.agent_id, response.json()["agent_token"])
    assert again.token != agent.token
    # The old token is dead at once: the real agent's next poll alarms if someone else did this.
    assert (await agent.poll()).status_code == 401
    held = await again.poll()
    assert held.status_code == 200 and held.headers["X-Policy-Sequence"] == "3"
    assert (await again.poll(after=3)).status_code == 204

    audits: list[AuditRecorded] = await read_topic(kafka_bootstrap, topics, topics.audit, expect=1)
    assert [(a.action, a.outcome, a.endpoint_id, a.account_id) for a in audits] == [
        ("agent.reenroll", "ok", agent.agent_id, "acct-1")
    ]
    assert audits[0].actor.sub == "enrollment-key:dev-derived"
    # Re-issuing a token does not register the endpoint a second time (the polls' last_seen
    # updates republish the same registration, enrolled_at unchanged).
    registered = await read_topic(kafka_bootstrap, topics, topics.endpoints)
    assert {(m.endpoint_id, m.enrolled_at) for m in registered} == {
        (agent.agent_id, registered[0].enrolled_at)
    }
    assert [m.endpoint_id for m in registered if m.last_seen is None] == [agent.agent_id]


async def test_reenrollment_with_another_accounts_endpoint_id_is_refused(
    enforcer: Running, topics: Topics, kafka_bootstrap: str
) -> None:
    _, http = enforcer
    victim = await enroll(http, "acct-2")
    refused = await reenroll(http, "acct-1", victim.agent_id)
    assert refused.status_code == 403
    assert refused.json()["errors"][0] == {
        "field": "body.endpoint_id",
        "rule": "same_account",
        "message": refused.json()["detail"],
    }
    # The victim's token still works: nothing was swapped.
    assert (await victim.poll()).status_code == 204
    audits: list[AuditRecorded] = await read_topic(kafka_bootstrap, topics, topics.audit, expect=1)
    assert [(a.action, a.outcome, a.endpoint_id) for a in audits] == [
        ("agent.reenroll", "denied", victim.agent_id)
    ]


async def test_reenrollment_with_an_id_the_enforcer_lost_recreates_it_in_the_account(
    enforcer: Running, topics: Topics, kafka_bootstrap: str
) -> None:
    _, http = enforcer
    response = await reenroll(http, "acct-1", "endpoint-lost-42")
    assert response.status_code == 201, response.text
    assert response.json()["agent_id"] == "endpoint-lost-42"
    agent = AgentClient(http, "endpoint-lost-42", response.json()["agent_token"])
    assert (await agent.poll()).status_code == 204
    registered: list[EndpointRegistered] = await read_topic(
        kafka_bootstrap, topics, topics.endpoints, expect=1
    )
    # Enrollment registrations only: the poll's last_seen update may be there too.
    assert [(m.endpoint_id, m.account_id) for m in registered if m.last_seen is None] == [
        ("endpoint-lost-42", "acct-1")
    ]


async def test_a_lost_agent_whose_policy_names_another_account_is_not_recreated(
    enforcer: Running, producer: object, topics: Topics, redis_url: str, redis_prefix: str
) -> None:
    _, http = enforcer
    victim = await enroll(http, "acct-2")
    await send_command(
        producer,
        topics.enforcer_commands,
        policy_command(victim.agent_id, 1, account_id="acct-2"),
    )

    async def held() -> bool:
        return (await victim.poll()).status_code == 200

    await wait_for(held, timeout=20)
    # The agent record is lost but the desired policy (account acct-2) survived.
    client = aioredis.Redis.from_url(
        redis_url, **redis_tls_options(redis_url, SECURITY.redis_ca_file)
    )
    try:
        agent_key = EnforcerKeys(Keys(redis_prefix)).agent(victim.agent_id)
        assert await client.delete(agent_key) == 1
    finally:
        await client.aclose()
    refused = await reenroll(http, "acct-1", victim.agent_id)
    assert refused.status_code == 403 and "endpoint_id" in refused.json()["detail"]


async def test_endpoint_id_must_be_a_plain_id(enforcer: Running) -> None:
    _, http = enforcer
    bad = await reenroll(http, "acct-1", "{slot}/../x")
    assert bad.status_code == 422
    assert "body.endpoint_id" in {err["field"] for err in bad.json()["errors"]}
    bad_account = await reenroll(http, "{acct-1}", "e1", key_account="acct-1")
    assert bad_account.status_code == 422
