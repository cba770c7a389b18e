"""The endpoint inventory and the isolation timeline on the real Kafka and Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from shared.messages import EndpointRegistered
from tests.helpers import wait_for
from tests.integration.isolation.conftest import Harness

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


async def enroll(
    h: Harness,
    endpoint_id: str,
    account_id: str,
    hostname: str,
    *,
    platform: str = "linux",
    enrolled_at: datetime = T0,
    last_seen: datetime | None = None,
) -> None:
    """What the enforcer publishes at enrollment (and, with last_seen, when the agent polls)."""
    await h.send(
        h.topics.endpoints,
        endpoint_id,
        EndpointRegistered(
            endpoint_id=endpoint_id,
            account_id=account_id,
            hostname=hostname,
            platform=platform,  # type: ignore[arg-type]
            enrolled_at=enrolled_at,
            last_seen=last_seen,
        ),
    )


async def inventory(
    h: Harness, account_id: str, headers: dict[str, str] | None = None, **params: Any
) -> dict[str, Any]:
    response = await h.http.get(
        f"/v1/accounts/{account_id}/endpoints", params=params, headers=headers or h.token()
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_enrolled_endpoints_are_listed_with_hostname_platform_and_state(h: Harness) -> None:
    await enroll(h, "ep-a", "acct-inv", "Web-01", enrolled_at=T0)
    await enroll(h, "ep-b", "acct-inv", "db-01", platform="windows")
    await enroll(h, "ep-x", "acct-other", "web-99")
    # Read-your-writes: enrollments acknowledged before the request are listed, no polling.
    body = await inventory(h, "acct-inv")
    assert body["next_cursor"] is None
    assert [(i["hostname"], i["platform"]) for i in body["items"]] == [
        ("db-01", "windows"),
        ("Web-01", "linux"),
    ]
    web = body["items"][1]
    assert web == {
        "endpoint_id": "ep-a",
        "hostname": "Web-01",
        "platform": "linux",
        "enrolled_at": "2026-01-05T09:00:00Z",
        "last_seen": None,
        "state": "not_isolated",
        "mode": None,
        "applied_sequence": 0,
    }


async def test_state_and_hostname_filters_select_rows(h: Harness) -> None:
    for i, host in enumerate(["WEB-01", "web-02", "db-01"]):
        await enroll(h, f"ep-{i}", "acct-f", host)
    response = await h.http.post(
        "/v1/endpoints/ep-1/isolation", json={"mode": "strict"}, headers=h.token()
    )
    assert response.status_code == 202, response.text
    (command,) = await h.commands(expect=1, priority=True)
    await h.report(command.policy)

    async def isolated() -> list[dict[str, Any]] | None:
        items = (await inventory(h, "acct-f", state="isolated"))["items"]
        return items or None

    (row,) = await wait_for(isolated, timeout=30, message="ep-1 isolated in the inventory")
    assert (row["endpoint_id"], row["mode"], row["applied_sequence"]) == ("ep-1", "strict", 1)
    web = await inventory(h, "acct-f", q="wEb")
    assert [i["hostname"] for i in web["items"]] == ["WEB-01", "web-02"]
    quiet = await inventory(h, "acct-f", q="web", state="not_isolated")
    assert [i["endpoint_id"] for i in quiet["items"]] == ["ep-0"]
    assert (await inventory(h, "acct-f", q="mail"))["items"] == []


async def test_pages_follow_the_cursor_through_every_endpoint_once(h: Harness) -> None:
    hosts = [f"host-{i:02d}" for i in range(7)]
    for i, host in enumerate(reversed(hosts)):
        await enroll(h, f"ep-p{i}", "acct-p", host)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = await inventory(h, "acct-p", **params)
        pages += 1
        assert len(body["items"]) <= 3
        seen += [i["hostname"] for i in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == hosts
    assert pages == 3
    # A new endpoint sorting before the cursor does not shift the next page (stable cursor).
    first = await inventory(h, "acct-p", limit=3)
    await enroll(h, "ep-new", "acct-p", "aaa-first")
    second = await inventory(h, "acct-p", limit=3, cursor=first["next_cursor"])
    assert [i["hostname"] for i in second["items"]] == hosts[3:6]


async def test_partner_sees_only_its_own_account_and_bad_parameters_are_422(h: Harness) -> None:
    await enroll(h, "ep-t", "acct-t", "web-t")
    own = await inventory(h, "acct-t", headers=h.partner("acct-t"))
    assert [i["endpoint_id"] for i in own["items"]] == ["ep-t"]
    other = await h.http.get("/v1/accounts/acct-t/endpoints", headers=h.partner("acct-u"))
    assert other.status_code == 403, other.text
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"cursor": "not-a-cursor!"}, "cursor"),
        ({"cursor": "djE6bm8tc2VwYXJhdG9y"}, "cursor"),  # base64 of a cursor without its parts
        ({"state": "asleep"}, "state"),
    ):
        response = await h.http.get(
            "/v1/accounts/acct-t/endpoints", params=params, headers=h.token()
        )
        assert response.status_code == 422, (params, response.text)
        assert field in response.text, response.text


async def test_last_seen_moves_forward_and_a_replayed_older_record_changes_nothing(
    h: Harness,
) -> None:
    seen = T0 + timedelta(hours=1)
    await enroll(h, "ep-ls", "acct-ls", "web-ls", last_seen=seen)
    (row,) = (await inventory(h, "acct-ls"))["items"]
    assert row["last_seen"] == "2026-01-05T10:00:00Z"
    # The compacted topic replayed (or an older record redelivered): the row keeps the newer one.
    await enroll(h, "ep-ls", "acct-ls", "old-name")
    (row,) = (await inventory(h, "acct-ls"))["items"]
    assert (row["hostname"], row["last_seen"]) == ("web-ls", "2026-01-05T10:00:00Z")
    # A rename at a later registration moves the row in the hostname order, without a duplicate.
    await enroll(h, "ep-ls", "acct-ls", "app-ls", last_seen=seen + timedelta(minutes=5))
    items = (await inventory(h, "acct-ls"))["items"]
    assert [(i["hostname"], i["last_seen"]) for i in items] == [("app-ls", "2026-01-05T10:05:00Z")]
    assert (await inventory(h, "acct-ls", q="web"))["items"] == []


async def test_timeline_lists_policies_with_author_reason_and_the_agents_answer(
    h: Harness,
) -> None:
    await enroll(h, "ep-tl", "acct-tl", "web-tl")
    await h.set_allowlist("acct-tl", ["203.0.113.10"])
    response = await h.http.post(
        "/v1/endpoints/ep-tl/isolation",
        json={"mode": "standard", "reason": "incident 42"},
        headers=h.token(),
    )
    assert response.status_code == 202, response.text
    (isolate,) = await h.commands(expect=1)
    await h.report(isolate.policy, "failed", "nft: table busy")
    await h.wait_processed("status", 1)
    response = await h.http.delete("/v1/endpoints/ep-tl/isolation", headers=h.token())
    assert response.status_code == 202, response.text
    (_, release) = await h.commands(expect=2)
    await h.report(release.policy)

    async def both_answered() -> list[dict[str, Any]] | None:
        got = await h.http.get("/v1/endpoints/ep-tl/isolation/timeline", headers=h.token())
        assert got.status_code == 200, got.text
        items: list[dict[str, Any]] = got.json()["items"]
        return items if items and items[0]["status"] == "applied" else None

    items = await wait_for(both_answered, timeout=30, message="release applied in the timeline")
    assert [(i["sequence"], i["mode"], i["status"]) for i in items] == [
        (2, "none", "applied"),
        (1, "standard", "failed"),
    ]
    first = items[1]
    assert first["issued_by"] == "soc-user"
    assert first["reason"] == "incident 42"
    assert first["settings_version"] == 1
    assert first["detail"] == "nft: table busy"
    assert first["policy_id"] == isolate.policy.policy_id
    assert first["request_ids"] == [isolate.request_id]
    limited = await h.http.get(
        "/v1/endpoints/ep-tl/isolation/timeline", params={"limit": 1}, headers=h.token()
    )
    assert [i["sequence"] for i in limited.json()["items"]] == [2]
    foreign = await h.http.get(
        "/v1/endpoints/ep-tl/isolation/timeline", headers=h.partner("acct-zz")
    )
    assert foreign.status_code == 403
    unknown = await h.http.get("/v1/endpoints/ep-none/isolation/timeline", headers=h.token())
    assert unknown.status_code == 404
