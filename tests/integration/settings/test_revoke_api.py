"""The revoke route on the real Redis and Kafka: durable first, 202 even when nothing can count."""

from __future__ import annotations

import pytest

from shared.messages import AllowlistChanged
from tests.helpers import read_topic
from tests.integration.settings.conftest import SOC, SettingsApp, bearer

pytestmark = pytest.mark.integration


async def test_revoke_commits_publishes_and_answers_202_without_a_count_when_isolation_is_away(
    settings_app: SettingsApp, kafka_bootstrap: str
) -> None:
    app = settings_app
    added = await app.add("acct-rv", "RMM", "203.0.113.10")
    assert added.status_code == 201, added.text
    entry_id = added.json()["entry"]["id"]
    # No isolation service answers here: the count is unknown, the revocation still happens.
    response = await app.client.post(
        app.url("acct-rv", f"/entries/{entry_id}/revoke"),
        json={"reason": "RMM compromised"},
        headers=bearer("partner", "acct-rv", sub="alice"),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["endpoints"] is None and "not counted" in body["note"]
    assert body["entry"]["address"] == "203.0.113.10" and body["version"] == 2
    assert response.headers["ETag"] == '"2"'
    current = await app.client.get(app.url("acct-rv"), headers=SOC)
    assert current.json()["entries"] == []
    history = await app.client.get(app.url("acct-rv", "/history"), headers=SOC)
    newest = history.json()["records"][0]
    assert newest["action"] == "allowlist.entry.revoke" and "RMM compromised" in newest["detail"]
    assert newest["actor"]["sub"] == "alice" and newest["after"] is None
    events = await read_topic(
        kafka_bootstrap, app.topics, app.topics.settings_allowlist, expect=2, timeout=30
    )
    revoking = [e for e in events if isinstance(e, AllowlistChanged) and e.version == 2]
    (revoked,) = revoking[0].revoked
    assert revoked.revocation_id == body["revocation_id"] and revoked.reason == "RMM compromised"


async def test_revoke_refusals_name_the_field_and_change_nothing(settings_app: SettingsApp) -> None:
    app = settings_app
    added = await app.add("acct-rf", "RMM", "203.0.113.10")
    entry_id = added.json()["entry"]["id"]
    url = app.url("acct-rf", f"/entries/{entry_id}/revoke")
    blank = await app.client.post(url, json={"reason": "  "}, headers=SOC)
    assert blank.status_code == 422
    [error] = blank.json()["errors"]
    assert (error["field"], error["rule"]) == ("body.reason", "required")
    missing = await app.client.post(url, json={}, headers=SOC)
    assert missing.status_code == 422
    unknown = await app.client.post(
        app.url("acct-rf", "/entries/nope/revoke"), json={"reason": "x"}, headers=SOC
    )
    assert unknown.status_code == 404
    foreign = await app.client.post(
        url, json={"reason": "x"}, headers=bearer("partner", "acct-other")
    )
    assert foreign.status_code == 403
    current = await app.client.get(app.url("acct-rf"), headers=SOC)
    assert [e["id"] for e in current.json()["entries"]] == [entry_id]
    assert current.json()["version"] == 1
