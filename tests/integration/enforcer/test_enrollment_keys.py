"""Enrollment keys on the real Kafka and Redis: rotation, revocation, hashed storage, rate limit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI

from services.enforcer.config import EnforcerSettings
from services.enforcer.signing import generate_private_key_b64
from shared.auth import mint_token
from shared.config import DEV_ENROLLMENT_SECRET, DEV_JWT_SECRET
from shared.enrollment import enrollment_key
from shared.messages import AuditRecorded
from shared.redis import redis_tls_options
from shared.topics import Topics
from tests.helpers import SECURITY, read_topic
from tests.integration.enforcer.conftest import AgentClient, running_enforcer

Running = tuple[FastAPI, httpx.AsyncClient]

SOC = {"Authorization": f"Bearer {mint_token(DEV_JWT_SECRET, sub='soc@hq', role='soc')}"}


def partner(account_id: str, secret: str = DEV_JWT_SECRET) -> dict[str, str]:
    token = mint_token(secret, sub=f"p@{account_id}", role="partner", account_id=account_id)
    return {"Authorization": f"Bearer {token}"}


async def rotate(
    http: httpx.AsyncClient, account_id: str, headers: dict[str, str] = SOC
) -> dict[str, Any]:
    response = await http.post(f"/v1/accounts/{account_id}/enrollment-keys", headers=headers)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


async def try_enroll(
    http: httpx.AsyncClient, account_id: str, key: str, **extra: Any
) -> httpx.Response:
    return await http.post(
        "/v1/agents/enroll",
        json={
            "account_id": account_id,
            "enrollment_key": key,
            "hostname": "web-01",
            "platform": "linux",
            **extra,
        },
    )


async def enroll_with(http: httpx.AsyncClient, account_id: str, key: str) -> AgentClient:
    response = await try_enroll(http, account_id, key)
    assert response.status_code == 201, response.text
    return AgentClient(http, response.json()["agent_id"], response.json()["agent_token"])


async def test_rotation_refuses_the_old_key_while_agents_enrolled_with_it_keep_polling(
    enforcer: Running,
) -> None:
    _, http = enforcer
    first = await rotate(http, "acct-1")
    assert first["enrollment_key"].startswith(f"hek_{first['key_id']}_")
    assert first["active"] is True and first["created_by"] == "soc@hq"
    agent = await enroll_with(http, "acct-1", first["enrollment_key"])

    second = await rotate(http, "acct-1")
    assert second["revoked_key_ids"] == [first["key_id"]]
    old = await try_enroll(http, "acct-1", first["enrollment_key"])
    assert old.status_code == 403
    assert old.headers["content-type"].startswith("application/problem+json")
    assert old.json()["errors"] == [
        {"field": "body.enrollment_key", "rule": "active_key", "message": old.json()["detail"]}
    ]
    # The agent's token never depended on the key it enrolled with.
    assert (await agent.poll()).status_code == 204
    await enroll_with(http, "acct-1", second["enrollment_key"])
    # The dev-derived key retires with the account's first rotation, even in dev mode.
    derived = await try_enroll(http, "acct-1", enrollment_key(DEV_ENROLLMENT_SECRET, "acct-1"))
    assert derived.status_code == 403
    # ...but other accounts still enroll with it in dev mode.
    await enroll_with(http, "acct-2", enrollment_key(DEV_ENROLLMENT_SECRET, "acct-2"))

    listed = await http.get("/v1/accounts/acct-1/enrollment-keys", headers=SOC)
    assert listed.status_code == 200
    items = listed.json()["items"]
    assert [(i["key_id"], i["active"]) for i in items] == [
        (first["key_id"], False),
        (second["key_id"], True),
    ]
    assert all("enrollment_key" not in i for i in items)


async def test_a_revoked_key_is_refused_for_enrollment(enforcer: Running) -> None:
    _, http = enforcer
    issued = await rotate(http, "acct-1")
    revoked = await http.delete(
        f"/v1/accounts/acct-1/enrollment-keys/{issued['key_id']}", headers=SOC
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["active"] is False and revoked.json()["revoked_at"] is not None
    assert (await try_enroll(http, "acct-1", issued["enrollment_key"])).status_code == 403
    again = await http.delete(
        f"/v1/accounts/acct-1/enrollment-keys/{issued['key_id']}", headers=SOC
    )
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    unknown = await http.delete("/v1/accounts/acct-1/enrollment-keys/0123456789abcdef", headers=SOC)
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["field"] == "path.key_id"
    # A key of one account never opens another account.
    other = await rotate(http, "acct-2")
    assert (await try_enroll(http, "acct-1", other["enrollment_key"])).status_code == 403


async def test_enrollment_keys_are_stored_only_as_hashes(
    enforcer: Running, redis_url: str, redis_prefix: str
) -> None:
    _, http = enforcer
    issued = [await rotate(http, "acct-1"), await rotate(http, "acct-1")]
    await enroll_with(http, "acct-1", issued[1]["enrollment_key"])
    client = aioredis.Redis.from_url(
        redis_url, **redis_tls_options(redis_url, SECURITY.redis_ca_file)
    )
    try:
        everything = b""
        names = [name async for name in client.scan_iter(match=f"{redis_prefix}*")]
        assert names
        for name in names:
            kind = (await client.type(name)).decode()
            if kind == "hash":
                everything += b"".join(k + v for k, v in (await client.hgetall(name)).items())
            elif kind == "string":
                everything += await client.get(name) or b""
            everything += name
        ek_keys = [n.decode() for n in names if b":ek:" in n]
        # Hash-tagged per account: one Cluster slot for everything of the account's keys.
        assert ek_keys == [f"{redis_prefix}enforcer:ek:{{acct-1}}"]
    finally:
        await client.aclose()
    for key in issued:
        secret = key["enrollment_key"].split("_", 2)[2]
        assert key["enrollment_key"].encode() not in everything
        assert secret.encode() not in everything


async def test_key_routes_need_a_user_token_of_the_account_and_refusals_are_audited(
    enforcer: Running, topics: Topics, kafka_bootstrap: str
) -> None:
    _, http = enforcer
    route = "/v1/accounts/acct-1/enrollment-keys"
    assert (await http.post(route)).status_code == 401
    assert (await http.get(route, headers=partner("acct-2"))).status_code == 403
    denied = await http.post(route, headers=partner("acct-2"))
    assert denied.status_code == 403 and denied.json()["errors"][0]["rule"] == "forbidden"
    service = {"Authorization": f"Bearer {mint_token(DEV_JWT_SECRET, sub='svc', role='service')}"}
    assert (await http.post(route, headers=service)).status_code == 403
    issued = await rotate(http, "acct-1", partner("acct-1"))
    bad_id = await http.delete(f"{route}/not-hex", headers=SOC)
    assert bad_id.status_code == 422
    await http.delete(f"{route}/{issued['key_id']}", headers=partner("acct-1"))

    audits: list[AuditRecorded] = await read_topic(kafka_bootstrap, topics, topics.audit, expect=5)
    seen = [(a.action, a.outcome, a.actor.sub) for a in audits]
    assert seen == [
        ("enrollment_key.list", "denied", "p@acct-2"),
        ("enrollment_key.rotate", "denied", "p@acct-2"),
        ("enrollment_key.rotate", "denied", "svc"),
        ("enrollment_key.rotate", "ok", "p@acct-1"),
        ("enrollment_key.revoke", "ok", "p@acct-1"),
    ]
    assert all(a.service == "enforcer" and a.account_id == "acct-1" for a in audits)
    assert issued["enrollment_key"] not in str([a.model_dump() for a in audits])


async def test_enrollment_rate_limit_answers_429_with_retry_after_and_spares_other_accounts(
    enforcer_settings: Callable[..., EnforcerSettings],
) -> None:
    async with running_enforcer(enforcer_settings(enrollment_rate_per_minute=3)) as (_, http):
        good = enrollment_key(DEV_ENROLLMENT_SECRET, "acct-1")
        # Wrong guesses use up the window too: guessing is slowed as much as enrolling.
        for _ in range(3):
            assert (
                await try_enroll(http, "acct-1", "hek_0123456789abcdef_" + "x" * 43)
            ).status_code == 403
        limited = await try_enroll(http, "acct-1", good)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        body = limited.json()
        assert body["status"] == 429
        assert body["errors"][0]["field"] == "body.account_id"
        assert body["errors"][0]["rule"] == "enrollment_rate"
        assert "at most 3 enrollment attempts per minute" in body["detail"]
        await enroll_with(http, "acct-2", enrollment_key(DEV_ENROLLMENT_SECRET, "acct-2"))


async def test_the_derived_key_is_refused_outside_dev_mode(
    enforcer_settings: Callable[..., EnforcerSettings],
) -> None:
    jwt_secret = "j" * 40
    enrollment_secret = "e" * 40
    settings = enforcer_settings(
        dev=False,
        jwt_secret=jwt_secret,
        enrollment_secret=enrollment_secret,
        signing_key=generate_private_key_b64(),
    )
    async with running_enforcer(settings) as (_, http):
        for secret in (enrollment_secret, DEV_ENROLLMENT_SECRET):
            refused = await try_enroll(http, "acct-1", enrollment_key(secret, "acct-1"))
            assert refused.status_code == 403, refused.text
        issued = await rotate(http, "acct-1", partner("acct-1", jwt_secret))
        await enroll_with(http, "acct-1", issued["enrollment_key"])


async def test_an_account_at_its_endpoint_cap_enrolls_no_new_endpoint_but_may_reenroll(
    enforcer_settings: Callable[..., EnforcerSettings],
) -> None:
    settings = enforcer_settings(enrollment_max_endpoints_per_account=2)
    async with running_enforcer(settings) as (_, http):
        key = enrollment_key(DEV_ENROLLMENT_SECRET, "acct-1")
        first = await enroll_with(http, "acct-1", key)
        await enroll_with(http, "acct-1", key)
        full = await try_enroll(http, "acct-1", key)
        assert full.status_code == 403
        assert full.json()["errors"][0]["rule"] == "max_endpoints"
        recreated = await try_enroll(http, "acct-1", key, endpoint_id="lost-endpoint")
        assert recreated.status_code == 403, "a re-created id counts like a new one"
        again = await try_enroll(http, "acct-1", key, endpoint_id=first.agent_id)
        assert again.status_code == 201 and again.json()["agent_id"] == first.agent_id
        await enroll_with(http, "acct-2", enrollment_key(DEV_ENROLLMENT_SECRET, "acct-2"))
