"""Guarantees 1-4, 6-8 and 10 on the real Kafka and Redis, through the REST API and the lanes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from shared.messages import (
    Actor,
    IsolateEndpoint,
    ReleaseEndpoint,
)
from tests.helpers import read_topic, wait_for
from tests.integration.isolation.conftest import Harness

PARTNER_1 = Actor(sub="alice", role="partner", account_id="acct-1")


def _v2_entry(**extra: Any) -> dict[str, Any]:
    """An allowlist v2 entry: IPv6 prefix, TCP ports, expiring in an hour."""
    return {
        "address": "2001:db8:1::/64",
        "ports": (443, 8041),
        "protocol": "tcp",
        "expires_at": datetime.now(UTC) + timedelta(hours=1),
        **extra,
    }


async def test_snapshot_is_allowlist_at_isolation_time_and_empty_when_off(h: Harness) -> None:
    await h.register("ep-on", "acct-1")
    await h.register("ep-off", "acct-2")
    v2 = _v2_entry()
    expired = _v2_entry(address="198.51.100.0/24", expires_at=datetime.now(UTC))
    await h.set_allowlist("acct-1", ["203.0.113.10", "203.0.113.11", v2, expired])
    await h.set_allowlist("acct-2", ["203.0.113.20", _v2_entry()], enabled=False)
    for endpoint in ("ep-on", "ep-off"):
        response = await h.http.post(
            f"/v1/endpoints/{endpoint}/isolation",
            json={"mode": "standard", "reason": "incident"},
            headers=h.token(),
        )
        assert response.status_code == 202, response.text
        assert response.json()["request_id"]
    commands = {c.policy.endpoint_id: c.policy for c in await h.commands(expect=2)}
    # v2: ports, protocol and expiry frozen with the entry; the expired entry left out.
    assert [p.address for p in commands["ep-on"].allowed_outbound] == [
        "203.0.113.10",
        "203.0.113.11",
        "2001:db8:1::/64",
    ]
    peer = commands["ep-on"].allowed_outbound[2]
    assert (peer.ports, peer.protocol, peer.expires_at) == (
        (443, 8041),
        "tcp",
        v2["expires_at"],
    )
    assert commands["ep-on"].settings_version == 1
    assert commands["ep-on"].platform == ("198.51.100.1",)
    assert commands["ep-off"].allowed_outbound == ()
    state = await h.state("ep-on")
    assert state["state"] == "isolation_pending"
    assert state["desired_sequence"] == 1
    assert state["policy"]["policy_id"] == commands["ep-on"].policy_id


async def test_settings_change_does_not_touch_isolated_endpoint_until_release_and_isolate(
    h: Harness,
) -> None:
    await h.register("ep-1", "acct-1")
    await h.set_allowlist("acct-1", ["203.0.113.10", _v2_entry()])
    isolate = {"mode": "standard"}
    assert (
        await h.http.post("/v1/endpoints/ep-1/isolation", json=isolate, headers=h.token())
    ).status_code == 202
    (first,) = await h.commands(expect=1)
    assert first.policy.allowed_outbound[1].ports == (443, 8041)
    # Narrowing the v2 entry's ports and dropping the other does not touch the frozen policy.
    await h.set_allowlist("acct-1", ["198.51.100.77", _v2_entry(ports=(443,))])
    # Repeating the isolate on the isolated endpoint changes nothing (guarantee 3).
    assert (
        await h.http.post("/v1/endpoints/ep-1/isolation", json=isolate, headers=h.token())
    ).status_code == 202
    await h.wait_processed("requests", 2)
    assert len(await h.commands()) == 1
    assert (await h.state("ep-1"))["policy"] == first.policy.model_dump(mode="json")
    assert (
        await h.http.delete("/v1/endpoints/ep-1/isolation", headers=h.token())
    ).status_code == 202
    assert (
        await h.http.post("/v1/endpoints/ep-1/isolation", json=isolate, headers=h.token())
    ).status_code == 202
    commands = await h.commands(expect=3)
    assert [c.policy.mode for c in commands] == ["standard", "none", "standard"]
    assert [c.policy.sequence for c in commands] == [1, 2, 3]
    assert [p.address for p in commands[2].policy.allowed_outbound] == [
        "198.51.100.77",
        "2001:db8:1::/64",
    ]
    assert commands[2].policy.allowed_outbound[1].ports == (443,)
    assert commands[0].policy == first.policy


async def test_strict_precedence_partner_cannot_release_or_loosen_and_is_audited(
    h: Harness,
) -> None:
    await h.register("ep-s", "acct-1")
    await h.set_allowlist("acct-1", ["203.0.113.10", _v2_entry()])
    partner = h.partner("acct-1")
    assert (
        await h.http.post(
            "/v1/endpoints/ep-s/isolation", json={"mode": "standard"}, headers=partner
        )
    ).status_code == 202
    (standard,) = await h.commands(expect=1)
    assert standard.policy.allowed_outbound[1].protocol == "tcp"
    # Anyone allowed may tighten to strict; it travels on the priority lane.
    assert (
        await h.http.post("/v1/endpoints/ep-s/isolation", json={"mode": "strict"}, headers=partner)
    ).status_code == 202
    (strict,) = await h.commands(expect=1, priority=True)
    assert strict.policy.mode == "strict"
    assert strict.policy.sequence == 2
    assert strict.policy.allowed_outbound == ()
    await wait_for(lambda: h.state("ep-s"), message="state")
    released = await h.http.delete("/v1/endpoints/ep-s/isolation", headers=partner)
    assert released.status_code == 403
    assert "SOC" in released.json()["detail"]
    loosened = await h.http.post(
        "/v1/endpoints/ep-s/isolation", json={"mode": "standard"}, headers=partner
    )
    assert loosened.status_code == 403
    # The SOC's standard request never downgrades strict: accepted, but no new policy.
    assert (
        await h.http.post(
            "/v1/endpoints/ep-s/isolation", json={"mode": "standard"}, headers=h.token()
        )
    ).status_code == 202
    # A partner release arriving over Kafka is dead-lettered and audited.
    await h.send(
        h.topics.isolation_requests_priority,
        "ep-s",
        ReleaseEndpoint(endpoint_id="ep-s", requested_by=PARTNER_1),
    )
    (dead,) = await read_topic(h.bootstrap, h.topics, h.topics.dlq, expect=1)
    assert "StrictOverrideDeniedError" in dead.reason
    await h.wait_processed("requests", 2)
    assert [c.policy.sequence for c in await h.commands()] == [1]
    assert len(await h.commands(priority=True)) == 1
    audits = await read_topic(h.bootstrap, h.topics, h.topics.audit, expect=5)
    denied = [a for a in audits if a.outcome == "denied"]
    assert len(denied) == 3
    assert all(a.endpoint_id == "ep-s" for a in denied)
    # The SOC releases strict.
    assert (
        await h.http.delete("/v1/endpoints/ep-s/isolation", headers=h.token())
    ).status_code == 202
    release = (await h.commands(expect=2))[-1]
    assert (release.policy.mode, release.policy.sequence) == ("none", 3)


async def test_status_moves_state_only_for_the_current_sequence(h: Harness) -> None:
    await h.register("ep-st", "acct-1")
    await h.send(
        h.topics.isolation_requests,
        "ep-st",
        IsolateEndpoint(endpoint_id="ep-st", mode="standard", requested_by=PARTNER_1),
    )
    (first,) = await h.commands(expect=1)
    await h.send(
        h.topics.isolation_requests_priority,
        "ep-st",
        IsolateEndpoint(endpoint_id="ep-st", mode="strict", requested_by=PARTNER_1),
    )
    (strict,) = await h.commands(expect=1, priority=True)
    await h.report(first.policy)  # stale: sequence 1 is superseded
    await h.wait_processed("status", 1)
    assert (await h.state("ep-st"))["state"] == "isolation_pending"
    await h.report(strict.policy, "failed", "nft: operation not permitted")
    await h.wait_processed("status", 2)
    state = await h.state("ep-st")
    assert (state["state"], state["detail"]) == ("failed", "nft: operation not permitted")
    await h.report(strict.policy)
    await h.wait_processed("status", 3)
    state = await h.state("ep-st")
    assert (state["state"], state["applied_sequence"], state["rules_sha256"]) == (
        "isolated",
        2,
        "d" * 64,
    )
    listed = await h.http.get("/v1/accounts/acct-1/isolations", headers=h.partner("acct-1"))
    assert [e["endpoint_id"] for e in listed.json()["endpoints"]] == ["ep-st"]
    await h.send(
        h.topics.isolation_requests_priority,
        "ep-st",
        ReleaseEndpoint(endpoint_id="ep-st", requested_by=Actor(sub="soc", role="soc")),
    )
    release = (await h.commands(expect=2))[-1]
    assert (await h.state("ep-st"))["state"] == "release_pending"
    await h.report(release.policy)
    await h.wait_processed("status", 4)
    state = await h.state("ep-st")
    assert (state["state"], state["applied_sequence"]) == ("not_isolated", 3)
    listed = await h.http.get("/v1/accounts/acct-1/isolations", headers=h.partner("acct-1"))
    assert listed.json()["endpoints"] == []


async def test_policies_only_hold_their_own_accounts_entries(h: Harness) -> None:
    accounts = {"acct-a": ["203.0.113.1", "203.0.113.2"], "acct-b": ["198.51.100.1"]}
    for account, addresses in accounts.items():
        await h.set_allowlist(account, addresses)
        for i in range(5):
            await h.register(f"{account}-ep{i}", account)
    for account in accounts:
        for i in range(5):
            response = await h.http.post(
                f"/v1/endpoints/{account}-ep{i}/isolation",
                json={"mode": "standard"},
                headers=h.partner(account),
            )
            assert response.status_code == 202
    for command in await h.commands(expect=10):
        expected = accounts[command.policy.account_id]
        assert command.policy.endpoint_id.startswith(command.policy.account_id)
        assert [p.address for p in command.policy.allowed_outbound] == expected
    # No partner token reads or changes another account.
    other = h.partner("acct-b")
    assert (
        await h.http.get("/v1/endpoints/acct-a-ep0/isolation", headers=other)
    ).status_code == 403
    assert (
        await h.http.delete("/v1/endpoints/acct-a-ep0/isolation", headers=other)
    ).status_code == 403
    assert (
        await h.http.post(
            "/v1/endpoints/acct-a-ep0/isolation", json={"mode": "strict"}, headers=other
        )
    ).status_code == 403
    assert (await h.http.get("/v1/accounts/acct-a/isolations", headers=other)).status_code == 403
    assert (
        await h.http.post("/v1/accounts/acct-a/strict-isolation", json={}, headers=other)
    ).status_code == 403
    assert (
        await h.http.get("/v1/endpoints/acct-a-ep0/isolation/preview", headers=other)
    ).status_code == 403


async def test_same_request_delivered_twice_yields_one_policy(h: Harness) -> None:
    await h.register("ep-r", "acct-1")
    request = IsolateEndpoint(endpoint_id="ep-r", mode="standard", requested_by=PARTNER_1)
    await h.send(h.topics.isolation_requests, "ep-r", request)
    await h.send(h.topics.isolation_requests, "ep-r", request)
    await h.wait_processed("requests", 2)
    commands = await h.commands(expect=1)
    assert len(commands) == 1
    assert commands[0].request_id == request.request_id
    assert (await h.state("ep-r"))["desired_sequence"] == 1


async def test_account_wide_strict_covers_isolated_and_pending_and_disables_allowlist(
    h: Harness,
) -> None:
    await h.set_allowlist("acct-1", ["203.0.113.10"])
    for endpoint in ("ep-a", "ep-b", "ep-c"):
        await h.register(endpoint, "acct-1")
    await h.register("ep-other", "acct-2")
    for endpoint in ("ep-a", "ep-b", "ep-other"):
        await h.send(
            h.topics.isolation_requests,
            endpoint,
            IsolateEndpoint(
                endpoint_id=endpoint, mode="standard", requested_by=Actor(sub="soc", role="soc")
            ),
        )
    first = await h.commands(expect=3)
    await h.report(next(c.policy for c in first if c.policy.endpoint_id == "ep-a"))
    await h.wait_processed("status", 1)
    response = await h.http.post(
        "/v1/accounts/acct-1/strict-isolation",
        json={"reason": "RMM compromised", "disable_allowlist": True},
        headers=h.partner("acct-1"),
    )
    assert response.status_code == 202, response.text
    assert response.json()["endpoints"] == 2
    strict = await h.commands(expect=2, priority=True)
    assert sorted(c.policy.endpoint_id for c in strict) == ["ep-a", "ep-b"]
    assert all(c.policy.mode == "strict" and c.policy.sequence == 2 for c in strict)
    await wait_for(lambda: h.settings_client.disabled == ["acct-1"], message="allowlist disabled")
    assert (await h.state("ep-c"))["state"] == "not_isolated"


async def test_bad_input_gets_clear_4xx_or_dlq_and_the_service_carries_on(h: Harness) -> None:
    assert (
        await h.http.post(
            "/v1/endpoints/nope/isolation", json={"mode": "standard"}, headers=h.token()
        )
    ).status_code == 404
    assert (await h.http.get("/v1/endpoints/nope/isolation", headers=h.token())).status_code == 404
    await h.register("ep-b", "acct-1")
    bad_mode = await h.http.post(
        "/v1/endpoints/ep-b/isolation", json={"mode": "lenient"}, headers=h.token()
    )
    assert bad_mode.status_code == 422
    assert bad_mode.json()["errors"][0]["field"] == "body.mode"
    bad_json = await h.http.post(
        "/v1/endpoints/ep-b/isolation",
        content=b"{not json",
        headers={**h.token(), "Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["errors"][0]["rule"] == "json_invalid"
    assert (
        await h.http.post("/v1/endpoints/ep-b/isolation", json={"mode": "strict"})
    ).status_code == 401
    assert (
        await h.http.post(
            "/v1/endpoints/ep-b/isolation",
            json={"mode": "strict"},
            headers={"Authorization": "Bearer x.y.z"},
        )
    ).status_code == 401
    await h.producer.send_and_wait(
        h.topics.isolation_requests, b'{"type": "IsolateEndpoint"}', key=b"ep-b"
    )
    await h.send(
        h.topics.isolation_requests,
        "ghost",
        IsolateEndpoint(endpoint_id="ghost", mode="standard", requested_by=PARTNER_1),
    )
    await h.send(
        h.topics.isolation_requests,
        "ep-b",
        IsolateEndpoint(
            endpoint_id="ep-b",
            mode="standard",
            requested_by=Actor(sub="m", role="partner", account_id="acct-9"),
        ),
    )
    await h.send(
        h.topics.isolation_requests,
        "ep-b",
        IsolateEndpoint(endpoint_id="ep-b", mode="standard", requested_by=PARTNER_1),
    )
    dead = await read_topic(h.bootstrap, h.topics, h.topics.dlq, expect=3)
    reasons = sorted(d.reason.split(":")[0] for d in dead)
    assert reasons == ["AccountForbiddenError", "EndpointNotFoundError", "invalid message"]
    (command,) = await h.commands(expect=1)
    assert command.policy.endpoint_id == "ep-b"


async def test_preview_is_a_dry_run_of_the_snapshot(h: Harness) -> None:
    await h.register("ep-p", "acct-1")
    await h.set_allowlist("acct-1", ["203.0.113.10"])
    response = await h.http.get("/v1/endpoints/ep-p/isolation/preview", headers=h.partner("acct-1"))
    assert response.status_code == 200
    policy = response.json()["policy"]
    assert [p["address"] for p in policy["allowed_outbound"]] == ["203.0.113.10"]
    assert policy["sequence"] == 1
    assert (await h.state("ep-p"))["state"] == "not_isolated"
    assert await h.commands() == []


async def test_cors_allows_the_portal_origin(h: Harness) -> None:
    response = await h.http.options(
        "/v1/endpoints/ep-1/isolation",
        headers={
            "Origin": "http://127.0.0.1:8001",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://127.0.0.1:8001"
    denied = await h.http.options(
        "/v1/endpoints/ep-1/isolation",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in denied.headers
