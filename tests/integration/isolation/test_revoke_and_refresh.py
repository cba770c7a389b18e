"""Revoke and refresh on the real Kafka and Redis: settings and isolation in-process, together.

The settings service commits the revocation and publishes it through its outbox; the isolation
service's revocation group fans it out on the priority request lane; the tightened policies
are read from the enforcer's priority command topic, as the enforcer would consume them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from services.settings.adapters.isolation_client import HttpRevocationCounter
from services.settings.bootstrap import build_app as build_settings_app
from services.settings.config import SettingsServiceSettings
from shared.config import DEV_JWT_SECRET
from shared.messages import AllowlistChanged, AuditRecorded, EnforcePolicy, RevokeEndpointPeer
from shared.topics import Topics
from tests.helpers import SECURITY, read_topic, wait_for
from tests.integration.isolation.conftest import Harness

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running_settings(
    h: Harness, kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The settings service, asking the in-process isolation service for revocation counts."""
    connection: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        **SECURITY.service_settings("settings", redis_url=redis_url),
    }
    settings = SettingsServiceSettings(
        dev=True,
        topic_prefix=topics.prefix,
        redis_prefix=redis_prefix,
        relay_lease_ms=1000,
        log_json=False,
        **connection,
    )
    counter = HttpRevocationCounter(
        "http://isolation", DEV_JWT_SECRET, transport=httpx.ASGITransport(app=h.app)
    )
    app = build_settings_app(settings, revocation_counter=counter)
    async with (
        LifespanManager(app, startup_timeout=60, shutdown_timeout=30),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://settings", timeout=30
        ) as client,
    ):
        yield client


async def add_entry(
    settings: httpx.AsyncClient, h: Harness, account: str, name: str, address: str
) -> str:
    response = await settings.post(
        f"/v1/accounts/{account}/tooling-allowlist/entries",
        json={"name": name, "address": address},
        headers=h.partner(account),
    )
    assert response.status_code == 201, response.text
    entry_id: str = response.json()["entry"]["id"]
    return entry_id


async def enable(settings: httpx.AsyncClient, h: Harness, account: str) -> None:
    response = await settings.patch(
        f"/v1/accounts/{account}/tooling-allowlist",
        json={"enabled": True},
        headers=h.partner(account),
    )
    assert response.status_code == 200, response.text


async def isolate(h: Harness, endpoint_id: str, account: str, mode: str = "standard") -> None:
    headers = h.token() if mode == "strict" else h.partner(account)
    response = await h.http.post(
        f"/v1/endpoints/{endpoint_id}/isolation", json={"mode": mode}, headers=headers
    )
    assert response.status_code == 202, response.text


async def applied_state(h: Harness, endpoint_id: str, sequence: int) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        state = await h.state(endpoint_id)
        ok = state["state"] == "isolated" and state["applied_sequence"] == sequence
        return state if ok else None

    return await wait_for(reached, timeout=30, message=f"{endpoint_id} applied {sequence}")


async def replica_sees(h: Harness, endpoint_id: str, addresses: list[str]) -> None:
    """Wait until a snapshot for ``endpoint_id`` would hold ``addresses``.

    A read_committed end offset can trail a just-committed relay transaction until the broker
    writes its commit markers, so the setup waits instead of racing it (see the branch's note).
    """

    async def seen() -> bool:
        response = await h.http.get(
            f"/v1/endpoints/{endpoint_id}/isolation/preview", headers=h.token()
        )
        policy = response.json().get("policy") if response.status_code == 200 else None
        return policy is not None and addresses_of(policy) == addresses

    await wait_for(seen, timeout=30, message=f"replica holds {addresses}")


def addresses_of(policy: dict[str, Any]) -> list[str]:
    return [p["address"] for p in policy["allowed_outbound"]]


async def report_all(h: Harness, commands: list[EnforcePolicy]) -> None:
    for command in commands:
        await h.report(command.policy)


def addresses(policy: Any) -> list[str]:
    return [p["address"] if isinstance(p, dict) else p.address for p in policy.allowed_outbound]


async def test_revoke_cuts_the_entry_from_every_isolated_endpoint_of_the_account_only(
    h: Harness, kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> None:
    async with running_settings(h, kafka_bootstrap, redis_url, topics, redis_prefix) as settings:
        rmm = await add_entry(settings, h, "acct-rv", "RMM", "203.0.113.10")
        await add_entry(settings, h, "acct-rv", "Relay", "203.0.113.20")
        await enable(settings, h, "acct-rv")
        # Another account lists the same address: revoking acct-rv's entry never touches it.
        await add_entry(settings, h, "acct-ot", "RMM", "203.0.113.10")
        await enable(settings, h, "acct-ot")
        for endpoint, account in (
            ("ep-rv-1", "acct-rv"),
            ("ep-rv-2", "acct-rv"),
            ("ep-rv-3", "acct-rv"),
            ("ep-ot-1", "acct-ot"),
        ):
            await h.register(endpoint, account)
        await replica_sees(h, "ep-rv-1", ["203.0.113.10", "203.0.113.20"])
        await replica_sees(h, "ep-ot-1", ["203.0.113.10"])
        await isolate(h, "ep-rv-1", "acct-rv")
        await isolate(h, "ep-rv-2", "acct-rv")
        await isolate(h, "ep-rv-3", "acct-rv", "strict")
        await isolate(h, "ep-ot-1", "acct-ot")
        await report_all(h, await h.commands(expect=3))
        await report_all(h, await h.commands(expect=1, priority=True))
        for endpoint in ("ep-rv-1", "ep-rv-2", "ep-rv-3", "ep-ot-1"):
            await applied_state(h, endpoint, 1)

        response = await settings.post(
            f"/v1/accounts/acct-rv/tooling-allowlist/entries/{rmm}/revoke",
            json={"reason": "RMM server compromised"},
            headers=h.partner("acct-rv"),
        )
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["entry_id"] == rmm and body["endpoints"] == 2
        assert body["entry"]["address"] == "203.0.113.10"
        revocation_id = body["revocation_id"]

        # Priority lane: the strict of ep-rv-3, then one tightened policy per affected endpoint.
        priority = await h.commands(expect=3, priority=True)
        tightened = [c for c in priority if c.request_id.startswith(f"{revocation_id}:")]
        assert sorted(c.policy.endpoint_id for c in tightened) == ["ep-rv-1", "ep-rv-2"]
        for command in tightened:
            assert command.policy.mode == "standard" and command.policy.sequence == 2
            assert addresses(command.policy) == ["203.0.113.20"]
        await report_all(h, tightened)
        for endpoint in ("ep-rv-1", "ep-rv-2"):
            state = await applied_state(h, endpoint, 2)
            assert [p["address"] for p in state["policy"]["allowed_outbound"]] == ["203.0.113.20"]

        async def all_applied() -> bool:
            progress = await h.http.get(
                f"/v1/accounts/acct-rv/revocations/{revocation_id}",
                params={"address": "203.0.113.10"},
                headers=h.partner("acct-rv"),
            )
            assert progress.status_code == 200, progress.text
            return progress.json() == {
                "account_id": "acct-rv",
                "revocation_id": revocation_id,
                "endpoints": 2,
                "tightened": 2,
                "applied": 2,
                "failed": 0,
            }

        await wait_for(all_applied, timeout=30, message="revocation applied by both agents")
        bad = await h.http.get(
            f"/v1/accounts/acct-rv/revocations/{revocation_id}",
            params={"address": "rmm.example.com"},
            headers=h.token(),
        )
        assert bad.status_code == 422, bad.text
        foreign = await h.http.get(
            f"/v1/accounts/acct-rv/revocations/{revocation_id}",
            params={"address": "203.0.113.10"},
            headers=h.partner("acct-ot"),
        )
        assert foreign.status_code == 403

        # Redelivery of the revoking event and of the per-endpoint requests: no second policy.
        events = await read_topic(kafka_bootstrap, topics, topics.settings_allowlist, timeout=30)
        revoking = [e for e in events if isinstance(e, AllowlistChanged) and e.revoked]
        assert len(revoking) == 1 and revoking[0].account_id == "acct-rv"
        fanned_before = h.processed("revocations")
        priority_before = h.processed("requests-priority")
        await h.send(topics.settings_allowlist, "acct-rv", revoking[0])
        requests = await read_topic(
            kafka_bootstrap, topics, topics.isolation_requests_priority, timeout=30
        )
        revokes = [r for r in requests if isinstance(r, RevokeEndpointPeer)]
        assert sorted(r.endpoint_id for r in revokes) == ["ep-rv-1", "ep-rv-2"]
        for request in revokes:
            await h.send(topics.isolation_requests_priority, request.endpoint_id, request)
        await h.wait_processed("revocations", fanned_before + 1)
        await h.wait_processed("requests-priority", priority_before + 2)
        assert len(await h.commands(priority=True)) == 3
        # Strict stayed strict, the other account kept its entry, both at sequence 1.
        strict = await h.state("ep-rv-3")
        assert (strict["mode"], strict["desired_sequence"]) == ("strict", 1)
        other = await h.state("ep-ot-1")
        assert other["desired_sequence"] == 1
        assert [p["address"] for p in other["policy"]["allowed_outbound"]] == ["203.0.113.10"]

        # Audited: who and why in settings' history and on audit.v1, each endpoint by name.
        history = await settings.get(
            "/v1/accounts/acct-rv/tooling-allowlist/history", headers=h.partner("acct-rv")
        )
        newest = history.json()["records"][0]
        assert newest["action"] == "allowlist.entry.revoke"
        assert "RMM server compromised" in newest["detail"]
        assert newest["actor"]["sub"] == "partner-user"

        async def audits() -> list[AuditRecorded] | None:
            found = await read_topic(kafka_bootstrap, topics, topics.audit, timeout=10)
            revokes = [a for a in found if a.action == "isolation.revoke"]
            return found if len(revokes) >= 2 else None

        trail = await wait_for(audits, timeout=30, message="revoke audits")
        settings_audit = [a for a in trail if a.action == "allowlist.entry.revoke"]
        assert len(settings_audit) == 1 and "RMM server compromised" in settings_audit[0].detail
        per_endpoint = [a for a in trail if a.action == "isolation.revoke"]
        assert {a.endpoint_id for a in per_endpoint} == {"ep-rv-1", "ep-rv-2"}
        assert all("RMM server compromised" in a.detail for a in per_endpoint)
        fan_out = [a for a in trail if a.action == "isolation.revoke_account"]
        assert fan_out and fan_out[0].after is not None
        assert fan_out[0].after["endpoints"] == ["ep-rv-1", "ep-rv-2"]
        assert fan_out[0].actor.sub == "partner-user"


async def test_refresh_opens_a_newly_added_entry_without_a_release(
    h: Harness, kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> None:
    async with running_settings(h, kafka_bootstrap, redis_url, topics, redis_prefix) as settings:
        await add_entry(settings, h, "acct-rf", "RMM", "203.0.113.10")
        await enable(settings, h, "acct-rf")
        for endpoint in ("ep-rf-1", "ep-rf-2", "ep-rf-3"):
            await h.register(endpoint, "acct-rf")
        await replica_sees(h, "ep-rf-1", ["203.0.113.10"])
        await isolate(h, "ep-rf-1", "acct-rf")
        await isolate(h, "ep-rf-2", "acct-rf", "strict")
        await report_all(h, await h.commands(expect=1))
        await applied_state(h, "ep-rf-1", 1)
        await add_entry(settings, h, "acct-rf", "Relay", "203.0.113.20")

        async def preview_with_the_new_entry() -> dict[str, Any] | None:
            preview = await h.http.get(
                "/v1/endpoints/ep-rf-1/isolation/preview", headers=h.partner("acct-rf")
            )
            assert preview.status_code == 200, preview.text
            body: dict[str, Any] = preview.json()
            return body if body["diff"]["added"] else None

        # Polled: a read_committed end offset can trail a just-committed relay transaction until
        # the broker writes its commit markers (reported to the lead; see the branch's note).
        view = await wait_for(preview_with_the_new_entry, timeout=30, message="preview diff")
        assert [p["address"] for p in view["diff"]["added"]] == ["203.0.113.20"]
        assert view["diff"]["removed"] == []
        assert view["current_settings_version"] == 3
        assert view["policy"]["sequence"] == 2

        response = await h.http.post(
            "/v1/endpoints/ep-rf-1/isolation/refresh",
            json={"reason": "relay added"},
            headers=h.partner("acct-rf"),
        )
        assert response.status_code == 202, response.text
        request_id = response.json()["request_id"]
        commands = await h.commands(expect=2)
        assert [c.policy.sequence for c in commands] == [1, 2]
        refreshed = commands[1]
        assert refreshed.request_id == request_id
        assert refreshed.policy.mode == "standard" and refreshed.policy.settings_version == 3
        assert addresses(refreshed.policy) == ["203.0.113.10", "203.0.113.20"]
        # No release in between: never a mode-none policy, and the endpoint stays cut off.
        assert all(c.policy.mode != "none" for c in commands)
        assert (await h.state("ep-rf-1"))["state"] == "isolation_pending"
        await report_all(h, [refreshed])
        await applied_state(h, "ep-rf-1", 2)
        after = await h.http.get("/v1/endpoints/ep-rf-1/isolation/preview", headers=h.token())
        assert after.json()["diff"] == {"added": [], "removed": []}

        # 409: strict stays strict; a never-isolated endpoint has nothing to refresh.
        for endpoint in ("ep-rf-2", "ep-rf-3"):
            refused = await h.http.post(
                f"/v1/endpoints/{endpoint}/isolation/refresh", json={}, headers=h.token()
            )
            assert refused.status_code == 409, refused.text
        # Another account's partner: 403, nothing sent.
        foreign = await h.http.post(
            "/v1/endpoints/ep-rf-1/isolation/refresh", json={}, headers=h.partner("acct-zz")
        )
        assert foreign.status_code == 403

        async def refresh_audit() -> list[AuditRecorded] | None:
            found = await read_topic(kafka_bootstrap, topics, topics.audit, timeout=10)
            hits = [a for a in found if a.action == "isolation.refresh" and a.outcome == "ok"]
            return hits or None

        (audit,) = await wait_for(refresh_audit, timeout=30, message="refresh audit")
        assert audit.endpoint_id == "ep-rf-1" and audit.actor.sub == "partner-user"
