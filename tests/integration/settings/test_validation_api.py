"""DESIGN.md §7 through the HTTP API on the real stack: each case's status, field and message."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from shared.topics import Topics
from tests.integration.settings.conftest import (
    SOC,
    SettingsApp,
    SettingsFactory,
    running_app,
)

CLOUD = "cloud RMMs with dynamic addresses are not supported"
OK = "203.0.113.77"

# (name, address, status, field, message fragment)
CASES: list[tuple[str, str, int, str | None, str]] = [
    # valid: public and private (RFC 1918) unicast addresses
    ("RMM", "203.0.113.10", 201, None, ""),
    ("RMM", "192.168.1.10", 201, None, ""),
    ("RMM", "10.0.0.1", 201, None, ""),
    ("RMM", "172.16.5.4", 201, None, ""),
    ("RMM", "172.31.255.254", 201, None, ""),
    ("RMM", "8.8.8.8", 201, None, ""),
    ("RMM", "100.63.255.254", 201, None, ""),
    ("RMM", "198.20.0.1", 201, None, ""),
    ("RMM", "223.255.255.254", 201, None, ""),
    ("RMM", "10.0.0.0", 201, None, ""),
    # hostnames and FQDNs
    ("RMM", "rmm.example.com", 422, "address", CLOUD),
    ("RMM", "localhost", 422, "address", CLOUD),
    ("RMM", "myrmm", 422, "address", CLOUD),
    ("RMM", "rmm.example.com.", 422, "address", CLOUD),
    ("RMM", "10.0.0.1.nip.io", 422, "address", CLOUD),
    # ranges, prefixes, IPv6, ports (allowlist v2: more in test_validation_v2_api.py)
    ("RMM", "10.0.0.0/24", 201, None, ""),
    ("RMM", "10.0.0.0/16", 422, "address", "no wider than /24"),
    ("RMM", "10.0.0.1-10.0.0.9", 422, "address", "address ranges and wildcards"),
    ("RMM", "10.0.0.*", 422, "address", "address ranges and wildcards"),
    ("RMM", "::1", 422, "address", "loopback address (::1)"),
    ("RMM", "2001:db8::1", 201, None, ""),
    ("RMM", "[2001:db8::1]", 422, "address", "without brackets"),
    ("RMM", "10.0.0.1:8080", 422, "address", "without a port"),
    # special-purpose IPv4 ranges
    ("RMM", "0.0.0.0", 422, "address", "0.0.0.0/8"),
    ("RMM", "0.1.2.3", 422, "address", "0.0.0.0/8"),
    ("RMM", "127.0.0.1", 422, "address", "loopback addresses"),
    ("RMM", "127.255.0.9", 422, "address", "loopback addresses"),
    ("RMM", "169.254.10.1", 422, "address", "link-local addresses"),
    ("RMM", "224.0.0.1", 422, "address", "multicast addresses"),
    ("RMM", "239.255.255.250", 422, "address", "multicast addresses"),
    ("RMM", "240.0.0.1", 422, "address", "reserved addresses"),
    ("RMM", "250.1.2.3", 422, "address", "reserved addresses"),
    ("RMM", "255.255.255.255", 422, "address", "broadcast address"),
    ("RMM", "100.64.0.1", 422, "address", "shared address space (100.64.0.0/10)"),
    ("RMM", "100.127.0.9", 422, "address", "shared address space (100.64.0.0/10)"),
    ("RMM", "192.0.0.8", 422, "address", "IETF protocol assignments (192.0.0.0/24)"),
    ("RMM", "198.18.0.1", 422, "address", "benchmarking addresses (198.18.0.0/15)"),
    ("RMM", "198.19.255.254", 422, "address", "benchmarking addresses (198.18.0.0/15)"),
    ("RMM", "192.88.99.1", 422, "address", "relay anycast range (192.88.99.0/24)"),
    # non-canonical forms
    ("RMM", "010.0.0.1", 422, "address", "leading zeros"),
    ("RMM", "10.0.0.01", 422, "address", "leading zeros"),
    ("RMM", "10.1", 422, "address", "shorthand forms such as 10.1"),
    ("RMM", "10.0.1", 422, "address", "shorthand forms such as 10.1"),
    ("RMM", "167772161", 422, "address", "shorthand forms such as 10.1"),
    ("RMM", "10.0.0.1.", 422, "address", "four numbers"),
    ("RMM", "10..0.1", 422, "address", "four numbers"),
    ("RMM", "0x0a.0.0.1", 422, "address", "hexadecimal forms"),
    ("RMM", "256.1.1.1", 422, "address", "between 0 and 255"),
    ("RMM", "\uff11\uff10.0.0.1", 422, "address", "must use ASCII digits"),
    ("RMM", "", 422, "address", "address is required"),
    # whitespace tricks
    ("RMM", " 10.0.0.1", 422, "address", "must not contain spaces"),
    ("RMM", "10.0.0.1 ", 422, "address", "must not contain spaces"),
    ("RMM", "10.0.0.1\n", 422, "address", "must not contain spaces"),
    ("RMM", "10.0.0.1\t", 422, "address", "must not contain spaces"),
    ("RMM", "10.0.\u200b0.1", 422, "address", "invisible characters"),
    ("RMM", "10.0.0.1\u00a0", 422, "address", "must not contain spaces"),
    # names
    ("", OK, 422, "name", "name must not be empty"),
    ("   ", OK, 422, "name", "name must not be empty"),
    ("a" * 65, OK, 422, "name", "at most 64 characters"),
    ("  " + "a" * 64 + "  ", OK, 201, None, ""),
    ("RMM\x00", OK, 422, "name", "printable characters only"),
    ("RMM\nServer", OK, 422, "name", "printable characters only"),
    ("RMM\u200bX", OK, 422, "name", "printable characters only"),
    ("\u3164", OK, 422, "name", "must contain a visible character"),
    ("\u2800\u2800", OK, 422, "name", "must contain a visible character"),
    ("\u0301\u0308", OK, 422, "name", "must contain a visible character"),
    ("\u115f\u1160\uffa0", OK, 422, "name", "must contain a visible character"),
    ("\u200b\u200d", OK, 422, "name", "must contain a visible character"),
    (" \u3164 \u2800 ", OK, 422, "name", "must contain a visible character"),
    ("e\u0301", OK, 201, None, ""),
    ("Kaseya VSA – Büro ✓", OK, 201, None, ""),
]


def test_the_table_has_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("name", "address", "status", "field", "message"),
    CASES,
    ids=[f"{i:02d}-{c[2]}-{(c[1] or c[0])[:20]!r}" for i, c in enumerate(CASES)],
)
async def test_entry_validation_answers_status_field_and_message(
    module_app: SettingsApp, name: str, address: str, status: int, field: str | None, message: str
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    response = await module_app.add(account, name, address)
    assert response.status_code == status, response.text
    body = response.json()
    stored = (await module_app.client.get(module_app.url(account), headers=SOC)).json()
    if status == 201:
        assert body["entry"]["address"] == address
        assert body["entry"]["name"] == name.strip()
        assert body["version"] == 1
        assert response.headers["ETag"] == '"1"'
        assert [e["address"] for e in stored["entries"]] == [address]
    else:
        [error] = body["errors"]
        assert error["field"] == f"body.{field}"
        assert message in error["message"], error["message"]
        assert response.json()["type"].startswith(f"urn:hostiso:problem:{field}.")
        assert error["rule"]
        assert stored["entries"] == [] and stored["version"] == 0


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"name": "RMM", "address": 167772161}, "address", "valid string"),
        ({"name": "RMM"}, "address", "Field required"),
        ({"name": None, "address": OK}, "name", "valid string"),
        ({"name": "RMM", "address": OK, "port": 443}, "port", "Extra inputs"),
        ({"name": ["RMM"], "address": OK}, "name", "valid string"),
    ],
)
async def test_wrong_json_types_name_the_field(
    module_app: SettingsApp, payload: dict[str, Any], field: str, message: str
) -> None:
    response = await module_app.client.post(
        module_app.url("acct-types", "/entries"), json=payload, headers=SOC
    )
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == f"body.{field}"
    assert message in error["message"]


async def test_malformed_json_is_a_400_naming_the_body(module_app: SettingsApp) -> None:
    response = await module_app.client.post(
        module_app.url("acct-json", "/entries"),
        content=b'{"name": "RMM", "address": ',
        headers={**SOC, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"].startswith("body")


async def test_switch_must_be_a_json_boolean(module_app: SettingsApp) -> None:
    response = await module_app.client.patch(
        module_app.url("acct-switch"), json={"enabled": "yes"}, headers=SOC
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body.enabled"


async def test_duplicate_address_is_409_naming_the_address(module_app: SettingsApp) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    assert (await module_app.add(account, "RMM", "192.168.7.7")).status_code == 201
    response = await module_app.add(account, "Other", "192.168.7.7")
    assert response.status_code == 409
    [error] = response.json()["errors"]
    assert error["field"] == "body.address"
    assert "already in this account's allowlist" in error["message"]
    other = (await module_app.add(account, "Other", "192.168.7.8")).json()
    readdress = await module_app.client.patch(
        module_app.url(account, f"/entries/{other['entry']['id']}"),
        json={"address": "192.168.7.7"},
        headers=SOC,
    )
    assert readdress.status_code == 409


async def test_invalid_readdress_is_refused_and_changes_nothing(module_app: SettingsApp) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    created = (await module_app.add(account, "RMM", "192.168.7.7")).json()
    url = module_app.url(account, f"/entries/{created['entry']['id']}")
    response = await module_app.client.patch(
        url, json={"address": "rmm.cloud.example"}, headers=SOC
    )
    assert response.status_code == 422
    assert CLOUD in response.json()["errors"][0]["message"]
    empty = await module_app.client.patch(url, json={}, headers=SOC)
    assert empty.status_code == 422
    missing = await module_app.client.patch(
        module_app.url(account, "/entries/no-such-entry"), json={"name": "x"}, headers=SOC
    )
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["field"] == "path.entry_id"
    stored = (await module_app.client.get(module_app.url(account), headers=SOC)).json()
    assert stored["version"] == 1


async def test_entry_limit_is_422_and_configurable(
    make_settings: SettingsFactory, topics: Topics
) -> None:
    async with running_app(make_settings(allowlist_max_entries=3)) as running:
        for i in range(3):
            assert (
                await running.add("acct-limit", f"RMM {i}", f"10.0.0.{i + 1}")
            ).status_code == 201
        response = await running.add("acct-limit", "one too many", "10.0.0.99")
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert error["field"] == "allowlist.entries"
        assert "maximum of 3 entries" in error["message"]


async def test_invalid_account_id_in_path_is_422(module_app: SettingsApp) -> None:
    response = await module_app.client.get(module_app.url("bad:account"), headers=SOC)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "path.account_id"


async def test_if_match_must_be_a_version(module_app: SettingsApp) -> None:
    response = await module_app.client.patch(
        module_app.url("acct-ifmatch"), json={"enabled": True}, headers={**SOC, "If-Match": "abc"}
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "header.If-Match"
