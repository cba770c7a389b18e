"""Allowlist history (DESIGN §4): pages newest first, bounded storage, compact records."""

from __future__ import annotations

import uuid

import orjson
import pytest

from services.settings.adapters.redis_store import RedisAllowlistStore
from tests.integration.settings.conftest import SOC, SettingsApp, SettingsFactory, running_app


async def _toggle(app: SettingsApp, account: str, times: int) -> None:
    for i in range(times):
        response = await app.client.patch(
            app.url(account), json={"enabled": i % 2 == 0}, headers=SOC
        )
        assert response.status_code == 200, response.text


async def test_history_pages_newest_first_until_next_before_version_is_null(
    module_app: SettingsApp,
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    await _toggle(module_app, account, 7)
    seen: list[list[int]] = []
    before: int | None = None
    while True:
        params: dict[str, int] = {"limit": 3}
        if before is not None:
            params["before_version"] = before
        response = await module_app.client.get(
            module_app.url(account, "/history"), params=params, headers=SOC
        )
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["account_id"] == account and page["version"] == 7
        assert len(page["records"]) <= 3
        seen.append([r["version"] for r in page["records"]])
        before = page["next_before_version"]
        if before is None:
            break
    assert seen == [[7, 6, 5], [4, 3, 2], [1]]
    default = await module_app.client.get(module_app.url(account, "/history"), headers=SOC)
    assert [r["version"] for r in default.json()["records"]] == [7, 6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"before_version": 0}, "before_version"),
        ({"before_version": "x"}, "before_version"),
    ],
)
async def test_invalid_paging_parameters_get_422_naming_the_field(
    module_app: SettingsApp, params: dict[str, object], field: str
) -> None:
    response = await module_app.client.get(
        module_app.url("acct-paging", "/history"), params=params, headers=SOC
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == f"query.{field}"


async def test_history_storage_is_trimmed_to_the_configured_maximum(
    make_settings: SettingsFactory,
) -> None:
    # Finding: every change was RPUSHed forever and one GET read the whole list.
    async with running_app(make_settings(history_max_records=5)) as app:
        account = f"acct-{uuid.uuid4().hex[:8]}"
        await _toggle(app, account, 12)
        store: RedisAllowlistStore = app.app.state.store
        assert await store.history_size(account) == 5
        response = await app.client.get(
            app.url(account, "/history"), params={"limit": 100}, headers=SOC
        )
        page = response.json()
        assert [r["version"] for r in page["records"]] == [12, 11, 10, 9, 8]
        assert page["next_before_version"] is None


async def test_a_record_stays_small_however_long_the_list(module_app: SettingsApp) -> None:
    # Finding: each record held the full before/after list (27.6 MiB for 1,000 toggles of 100).
    account = f"acct-{uuid.uuid4().hex[:8]}"
    for i in range(60):
        added = await module_app.add(
            account, f"RMM {i:02d} with a long display name", f"10.7.0.{i + 1}"
        )
        assert added.status_code == 201, added.text
    await _toggle(module_app, account, 2)
    response = await module_app.client.get(
        module_app.url(account, "/history"), params={"limit": 2}, headers=SOC
    )
    records = response.json()["records"]
    assert [(r["before"], r["after"]) for r in records] == [
        ({"enabled": True}, {"enabled": False}),
        ({"enabled": False}, {"enabled": True}),
    ]
    assert max(len(orjson.dumps(r)) for r in records) < 600
