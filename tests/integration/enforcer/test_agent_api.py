"""The agent API on the real Kafka and Redis: enrollment, token scope, validation, status reports."""

from __future__ import annotations

import base64
from typing import Any

import httpx
from fastapi import FastAPI

from services.enforcer.domain import NORMAL_LANE
from services.enforcer.signing import verify_signed_policy
from shared.config import DEV_ENROLLMENT_SECRET
from shared.enrollment import enrollment_key
from shared.messages import SignedPolicy
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.enforcer.conftest import enroll, policy_command, send_command

Running = tuple[FastAPI, httpx.AsyncClient]


async def test_enrollment_with_the_account_key_registers_the_endpoint(
    enforcer: Running, topics: Topics, kafka_bootstrap: str
) -> None:
    _, http = enforcer
    agent = await enroll(http, "acct-7")
    registered = await read_topic(kafka_bootstrap, topics, topics.endpoints, expect=1)
    assert [(m.endpoint_id, m.account_id) for m in registered] == [(agent.agent_id, "acct-7")]
    assert (await agent.poll()).status_code == 204


async def test_enrollment_with_a_wrong_key_or_bad_fields_is_refused(enforcer: Running) -> None:
    _, http = enforcer
    body = {
        "account_id": "acct-1",
        "enrollment_key": enrollment_key(DEV_ENROLLMENT_SECRET, "acct-2"),
        "hostname": "web-01",
        "platform": "linux",
    }
    wrong = await http.post("/v1/agents/enroll", json=body)
    assert wrong.status_code == 403
    assert "enrollment_key" in wrong.json()["detail"]
    bad = await http.post("/v1/agents/enroll", json={**body, "platform": "amiga", "hostname": ""})
    assert bad.status_code == 422
    fields = {tuple(err["field"].split(".")) for err in bad.json()["errors"]}
    assert {("body", "platform"), ("body", "hostname")} <= fields
    not_json = await http.post(
        "/v1/agents/enroll", content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    assert not_json.headers["content-type"] == "application/problem+json"


async def test_agent_token_opens_only_its_own_routes(enforcer: Running) -> None:
    _, http = enforcer
    a, b = await enroll(http), await enroll(http)
    foreign = await http.get(f"/v1/agents/{b.agent_id}/policy", headers=a.auth)
    # Another agent's token is no token of this agent (checked in this endpoint's own slot).
    assert foreign.status_code == 401 and b.agent_id in foreign.json()["detail"]
    foreign_report = await http.post(
        f"/v1/agents/{b.agent_id}/policy-status",
        headers=a.auth,
        json={"sequence": 1, "policy_id": "p", "status": "failed", "detail": "x"},
    )
    assert foreign_report.status_code == 401
    assert (await http.get(f"/v1/agents/{a.agent_id}/policy")).status_code == 401
    forged = await http.get(
        f"/v1/agents/{a.agent_id}/policy", headers={"Authorization": "Bearer forged"}
    )
    assert forged.status_code == 401


async def test_poll_parameters_are_validated(enforcer: Running) -> None:
    _, http = enforcer
    agent = await enroll(http)
    too_long = await agent.poll(wait=3600)
    assert too_long.status_code == 422 and "wait" in str(too_long.json()["detail"])
    negative = await http.get(
        f"/v1/agents/{agent.agent_id}/policy", params={"after": -1}, headers=agent.auth
    )
    assert negative.status_code == 422
    not_int = await http.get(
        f"/v1/agents/{agent.agent_id}/policy", params={"after": "x"}, headers=agent.auth
    )
    assert not_int.status_code == 422


async def test_signed_policy_verifies_with_the_published_key_and_reports_are_published(
    enforcer: Running, producer: Any, topics: Topics, kafka_bootstrap: str
) -> None:
    app, http = enforcer
    agent = await enroll(http)
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 1))
    response = await agent.poll(after=0, wait=20)
    assert response.status_code == 200
    signed = SignedPolicy.model_validate_json(response.content)
    key = (await http.get("/v1/signing-key")).json()
    assert key["algorithm"] == "Ed25519" and key["key_id"] == signed.key_id
    public = base64.b64decode(key["public_key"])
    assert verify_signed_policy(signed, public)
    tampered = signed.policy.model_copy(update={"mode": "none"})
    assert not verify_signed_policy(signed.model_copy(update={"policy": tampered}), public)

    applied = {
        "sequence": 1,
        "policy_id": signed.policy.policy_id,
        "status": "applied",
        "rules_sha256": "c" * 64,
        "detail": "",
    }
    accepted = await agent.report(**applied)
    assert accepted.status_code == 202, accepted.text
    reports = await read_topic(kafka_bootstrap, topics, topics.isolation_status, expect=1)
    assert [(r.endpoint_id, r.sequence, r.status, r.rules_sha256) for r in reports] == [
        (agent.agent_id, 1, "applied", "c" * 64)
    ]
    assert (await agent.report(**{**applied, "sequence": 9})).status_code == 409
    stale = await agent.report(**{**applied, "rules_sha256": None})
    assert stale.status_code == 422 and "rules_sha256" in stale.json()["detail"]
    missing = await agent.report(sequence=1, status="applied")
    assert missing.status_code == 422

    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 2))
    lane = app.state.lanes[NORMAL_LANE]
    await wait_for(lambda: lane.processed >= 2, message="second policy stored")
    superseded = await agent.report(**applied)
    assert superseded.status_code == 409 and "superseded" in superseded.json()["detail"]
    metrics = (await http.get("/metrics")).text
    assert 'hostiso_enforcer_status_reports_total{status="applied"} 1.0' in metrics
    assert 'hostiso_enforcer_policies_stored_total{lane="normal"} 2.0' in metrics
    assert "hostiso_enforcer_waiting_agents" in metrics
