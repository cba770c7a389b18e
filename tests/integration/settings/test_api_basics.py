"""The settings REST contract (DESIGN.md §4): shapes, ETag and If-Match, history, ops routes."""

from __future__ import annotations

import uuid

from shared.config import DEV_ENROLLMENT_SECRET
from shared.enrollment import enrollment_key
from tests.integration.settings.conftest import SOC, SettingsApp, bearer


async def test_allowlist_lifecycle_carries_versions_and_etags(module_app: SettingsApp) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    client = module_app.client
    empty = await client.get(module_app.url(account), headers=SOC)
    assert empty.json() == {
        "account_id": account,
        "enabled": False,
        "entries": [],
        "version": 0,
        "updated_at": None,
    }
    assert empty.headers["ETag"] == '"0"'
    partner = bearer("partner", account, sub="alice@msp.example")
    added = await module_app.add(account, " ConnectWise ", "198.51.100.7", headers=partner)
    assert added.status_code == 201
    entry = added.json()["entry"]
    assert entry["name"] == "ConnectWise" and entry["created_by"] == "alice@msp.example"
    assert added.headers["Location"].endswith(f"/entries/{entry['id']}")
    switched = await client.patch(
        module_app.url(account), json={"enabled": True}, headers={**partner, "If-Match": '"1"'}
    )
    assert switched.status_code == 200 and switched.headers["ETag"] == '"2"'
    renamed = await client.patch(
        module_app.url(account, f"/entries/{entry['id']}"),
        json={"name": "CW Automate", "address": "198.51.100.8"},
        headers={**partner, "If-Match": 'W/"2"'},
    )
    assert renamed.status_code == 200
    assert renamed.json()["entry"]["address"] == "198.51.100.8"
    assert renamed.json()["entry"]["created_at"] == entry["created_at"]
    stale_delete = await client.delete(
        module_app.url(account, f"/entries/{entry['id']}"), headers={**partner, "If-Match": '"2"'}
    )
    assert stale_delete.status_code == 412
    assert stale_delete.json()["errors"][0]["field"] == "header.If-Match"
    removed = await client.delete(
        module_app.url(account, f"/entries/{entry['id']}"), headers={**partner, "If-Match": '"3"'}
    )
    assert removed.status_code == 200 and removed.json()["version"] == 4
    assert removed.json()["entries"] == []
    unchanged = await client.patch(module_app.url(account), json={"enabled": True}, headers=partner)
    assert unchanged.json()["version"] == 4, "a no-op switch is not a new version"

    history = (await client.get(module_app.url(account, "/history"), headers=partner)).json()
    assert [r["version"] for r in history["records"]] == [4, 3, 2, 1]
    assert [r["action"] for r in history["records"]] == [
        "allowlist.entry.remove",
        "allowlist.entry.update",
        "allowlist.enable",
        "allowlist.entry.add",
    ]
    assert history["next_before_version"] is None
    first = history["records"][-1]
    assert first["actor"] == {"sub": "alice@msp.example", "role": "partner", "account_id": account}
    # Each record says what changed (the entry or the switch), not the whole list twice.
    entry_ref = {"id": entry["id"], "name": "ConnectWise", "address": "198.51.100.7"}
    assert (first["before"], first["after"]) == (None, entry_ref)
    removed_record, renamed_record, switch_record, _ = history["records"]
    assert (switch_record["before"], switch_record["after"]) == (
        {"enabled": False},
        {"enabled": True},
    )
    renamed_ref = {"id": entry["id"], "name": "CW Automate", "address": "198.51.100.8"}
    assert (renamed_record["before"], renamed_record["after"]) == (entry_ref, renamed_ref)
    assert (removed_record["before"], removed_record["after"]) == (renamed_ref, None)


async def test_enrollment_key_route_is_gone_and_shows_no_secret(module_app: SettingsApp) -> None:
    response = await module_app.client.get("/v1/accounts/acct-enroll/enrollment-key", headers=SOC)
    assert response.status_code == 410
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["location"] == "/v1/accounts/acct-enroll/enrollment-keys"
    assert body["errors"][0]["rule"] == "moved"
    assert enrollment_key(DEV_ENROLLMENT_SECRET, "acct-enroll") not in response.text


async def test_docs_health_ready_and_metrics_are_served(module_app: SettingsApp) -> None:
    client = module_app.client
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/accounts/{account_id}/tooling-allowlist/entries/{entry_id}" in schema["paths"]
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"]
    metrics = (await client.get("/metrics")).text
    for name in (
        "hostiso_http_requests_total",
        "hostiso_settings_outbox_depth",
        "hostiso_settings_publish_latency_seconds",
    ):
        assert name in metrics
