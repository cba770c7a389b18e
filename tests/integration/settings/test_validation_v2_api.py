"""Allowlist v2 entries through the real settings API (DESIGN §7, issue 12): IPv4 CIDR, IPv6,
ports, protocol, expiry, canonical storage and coverage-based duplicates. Each case asserts
the status, the field and the rule (and, when accepted, what is stored)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.integration.settings.conftest import SOC, SettingsApp, SettingsFactory, running_app

OK = "203.0.113.77"


def _error(response: httpx.Response) -> tuple[str, str, str]:
    """(field, rule, message) of the first error, in the settings service's error format
    (``detail[{loc, type: FIELD.RULE, msg}]``, or RFC 9457 ``errors[{field, rule, message}]``)."""
    body = response.json()
    if "errors" in body:
        error = body["errors"][0]
        field = str(error["field"])
        for location in ("body.", "query.", "path.", "header."):
            field = field.removeprefix(location)
        # The table names the body field; a problem may point inside it (``ports.0``).
        return field.split(".")[0], str(error["rule"]), str(error["message"])
    error = body["detail"][0]
    field, _, rule = str(error["type"]).partition(".")
    if not rule:  # a pydantic type error: loc names the field, type the rule
        field, rule = str(error["loc"][1]), str(error["type"])
    return field, rule, str(error["msg"])


def _expiry(token: object) -> object:
    """``"+2h"``-style tokens become times relative to now (UTC), the rest passes through."""
    if not isinstance(token, str) or token[:1] not in "+-" or len(token) < 2:
        return token
    amount, unit = int(token[1:-1]), token[-1]
    delta = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1)}.get(
        unit, timedelta(days=1)
    )
    sign = 1 if token[0] == "+" else -1
    return (datetime.now(UTC) + sign * amount * delta).isoformat()


A = "address"
# (extra fields besides name, status, field, rule, stored address (201) or None)
CASES: list[tuple[dict[str, Any], int, str | None, str | None, str | None]] = [
    # IPv4 CIDR within /24, host bits zero, canonical /32
    ({A: "198.51.100.0/24"}, 201, None, None, "198.51.100.0/24"),
    ({A: "198.51.100.128/25"}, 201, None, None, "198.51.100.128/25"),
    ({A: "198.51.100.8/29"}, 201, None, None, "198.51.100.8/29"),
    ({A: "198.51.100.7/32"}, 201, None, None, "198.51.100.7"),
    ({A: "10.20.30.0/24"}, 201, None, None, "10.20.30.0/24"),
    ({A: "192.168.1.0/30"}, 201, None, None, "192.168.1.0/30"),
    ({A: "198.51.100.0/23"}, 422, A, "prefix_too_wide", None),
    ({A: "10.0.0.0/8"}, 422, A, "prefix_too_wide", None),
    ({A: "0.0.0.0/0"}, 422, A, "prefix_too_wide", None),
    ({A: "198.51.100.1/24"}, 422, A, "host_bits", None),
    ({A: "198.51.100.9/29"}, 422, A, "host_bits", None),
    ({A: "198.51.100.0/33"}, 422, A, "prefix_length", None),
    ({A: "198.51.100.0/255.255.255.0"}, 422, A, "prefix_length", None),
    ({A: "198.51.100.0/024"}, 422, A, "prefix_length", None),
    ({A: "198.51.100.0/"}, 422, A, "prefix_length", None),
    ({A: "198.51.100.0/x"}, 422, A, "prefix_length", None),
    ({A: "127.0.0.0/24"}, 422, A, "loopback", None),
    ({A: "169.254.1.0/24"}, 422, A, "link_local", None),
    ({A: "224.0.0.0/24"}, 422, A, "multicast", None),
    ({A: "240.0.0.0/24"}, 422, A, "reserved", None),
    ({A: "100.64.0.0/24"}, 422, A, "shared_address_space", None),
    ({A: "192.0.0.0/24"}, 422, A, "ietf_protocol", None),
    ({A: "198.18.0.0/24"}, 422, A, "benchmarking", None),
    ({A: "192.88.99.0/24"}, 422, A, "anycast", None),
    ({A: "0.0.0.0/24"}, 422, A, "this_network", None),
    ({A: "255.255.255.255/32"}, 422, A, "broadcast", None),
    ({A: "010.0.0.0/24"}, 422, A, "leading_zeros", None),
    ({A: "10.0/24"}, 422, A, "shorthand", None),
    # IPv6 addresses in any RFC 4291 form, stored RFC 5952
    ({A: "2001:db8::10"}, 201, None, None, "2001:db8::10"),
    ({A: "2001:DB8::10"}, 201, None, None, "2001:db8::10"),
    ({A: "2001:0db8:0000:0000:0000:0000:0000:0010"}, 201, None, None, "2001:db8::10"),
    ({A: "2001:db8:0:0:1:0:0:1"}, 201, None, None, "2001:db8::1:0:0:1"),
    ({A: "2001:db8::1:0:0:0:1"}, 201, None, None, "2001:db8:0:1::1"),
    ({A: "fd12:3456:789a::5"}, 201, None, None, "fd12:3456:789a::5"),
    ({A: "2606:4700:4700::1111"}, 201, None, None, "2606:4700:4700::1111"),
    ({A: "2001:db8::10/128"}, 201, None, None, "2001:db8::10"),
    ({A: "2001:db8:1::/64"}, 201, None, None, "2001:db8:1::/64"),
    ({A: "2001:DB8:1:0::/64"}, 201, None, None, "2001:db8:1::/64"),
    ({A: "2001:db8:1:2::/96"}, 201, None, None, "2001:db8:1:2::/96"),
    ({A: "2001:db8::/48"}, 422, A, "prefix_too_wide", None),
    ({A: "2001:db8::/63"}, 422, A, "prefix_too_wide", None),
    ({A: "2001:db8::1/64"}, 422, A, "host_bits", None),
    ({A: "2001:db8::/129"}, 422, A, "prefix_length", None),
    ({A: "2001:db8::g"}, 422, A, "hostname", None),
    ({A: "2001:db8:::1"}, 422, A, "not_ipv6", None),
    ({A: "2001:db8::1::2"}, 422, A, "not_ipv6", None),
    ({A: "1:2:3:4:5:6:7:8:9"}, 422, A, "not_ipv6", None),
    ({A: "fe80::1%eth0"}, 422, A, "zone_id", None),
    ({A: "fe80::1"}, 422, A, "link_local", None),
    ({A: "fe80::/64"}, 422, A, "link_local", None),
    ({A: "::1"}, 422, A, "loopback", None),
    ({A: "::"}, 422, A, "unspecified", None),
    ({A: "ff02::1"}, 422, A, "multicast", None),
    ({A: "::ffff:203.0.113.10"}, 422, A, "ipv4_mapped", None),
    ({A: "::203.0.113.10"}, 422, A, "ipv4_compatible", None),
    ({A: "64:ff9b::203.0.113.10"}, 422, A, "nat64", None),
    ({A: "2001::1"}, 422, A, "teredo", None),
    ({A: "2002:cb00:710a::1"}, 422, A, "6to4", None),
    ({A: "[2001:db8::10]"}, 422, A, "brackets", None),
    ({A: "[2001:db8::10]:443"}, 422, A, "port", None),
    ({A: "2001:db8::1-2001:db8::9"}, 422, A, "range", None),
    ({A: "rmm.example.com:443"}, 422, A, "hostname", None),
    ({A: "rmm.example.com"}, 422, A, "hostname", None),
    # ports and protocol
    ({A: OK, "ports": [8041], "protocol": "tcp"}, 201, None, None, OK),
    ({A: OK, "ports": [443, 80, 8041], "protocol": "tcp"}, 201, None, None, OK),
    ({A: OK, "ports": [514], "protocol": "udp"}, 201, None, None, OK),
    ({A: OK, "ports": [], "protocol": "tcp"}, 201, None, None, OK),
    ({A: OK, "protocol": "udp"}, 201, None, None, OK),
    ({A: OK, "protocol": "any"}, 201, None, None, OK),
    ({A: OK, "ports": [], "protocol": "any"}, 201, None, None, OK),
    ({A: OK, "ports": [1, 65535], "protocol": "tcp"}, 201, None, None, OK),
    ({A: OK, "ports": list(range(1, 17)), "protocol": "tcp"}, 201, None, None, OK),
    ({A: "2001:db8::10", "ports": [8041], "protocol": "tcp"}, 201, None, None, "2001:db8::10"),
    ({A: "198.51.100.0/24", "ports": [443], "protocol": "tcp"}, 201, None, None, "198.51.100.0/24"),
    ({A: OK, "ports": list(range(1, 18)), "protocol": "tcp"}, 422, "ports", "too_many", None),
    ({A: OK, "ports": [0], "protocol": "tcp"}, 422, "ports", "port_range", None),
    ({A: OK, "ports": [65536], "protocol": "tcp"}, 422, "ports", "port_range", None),
    ({A: OK, "ports": [-1], "protocol": "udp"}, 422, "ports", "port_range", None),
    ({A: OK, "ports": [443, 443], "protocol": "tcp"}, 422, "ports", "duplicate_port", None),
    ({A: OK, "ports": [443]}, 422, "protocol", "required_for_ports", None),
    ({A: OK, "ports": [443], "protocol": "any"}, 422, "protocol", "required_for_ports", None),
    ({A: OK, "protocol": "icmp"}, 422, "protocol", "unknown", None),
    ({A: OK, "protocol": "TCP"}, 422, "protocol", "unknown", None),
    ({A: OK, "protocol": ""}, 422, "protocol", "unknown", None),
    ({A: OK, "ports": ["443"], "protocol": "tcp"}, 422, "ports", "int_type", None),
    ({A: OK, "ports": [443.0], "protocol": "tcp"}, 422, "ports", "int_type", None),
    ({A: OK, "ports": [True], "protocol": "tcp"}, 422, "ports", "int_type", None),
    ({A: OK, "ports": 443, "protocol": "tcp"}, 422, "ports", "list_type", None),
    ({A: OK, "protocol": 6}, 422, "protocol", "string_type", None),
    # expiry: future, at most 90 days, with an offset
    ({A: OK, "expires_at": "+2h"}, 201, None, None, OK),
    ({A: OK, "expires_at": "+89d"}, 201, None, None, OK),
    ({A: OK, "expires_at": None}, 201, None, None, OK),
    (
        {A: "2001:db8::10", "ports": [22], "protocol": "tcp", "expires_at": "+1d"},
        201,
        None,
        None,
        "2001:db8::10",
    ),
    ({A: OK, "expires_at": "-1h"}, 422, "expires_at", "past", None),
    ({A: OK, "expires_at": "+91d"}, 422, "expires_at", "too_far", None),
    ({A: OK, "expires_at": "2026-12-24T08:30:00"}, 422, "expires_at", "timezone", None),
    ({A: OK, "expires_at": "2026-12-24"}, 422, "expires_at", "format", None),
    ({A: OK, "expires_at": "tomorrow"}, 422, "expires_at", "format", None),
    ({A: OK, "expires_at": ""}, 422, "expires_at", "format", None),
    ({A: OK, "expires_at": 1767225600}, 422, "expires_at", "string_type", None),
    # the v1 form keeps meaning what it always did
    ({A: "203.0.113.10"}, 201, None, None, "203.0.113.10"),
    ({A: "192.168.1.10"}, 201, None, None, "192.168.1.10"),
]


def test_the_v2_table_has_at_least_eighty_cases() -> None:
    assert len(CASES) >= 80
    assert len({repr(c[0]) for c in CASES}) == len(CASES), "duplicate cases"


@pytest.mark.parametrize(
    ("fields", "status", "field", "rule", "stored"),
    CASES,
    ids=[f"{i:03d}-{c[1]}-{c[3] or 'ok'}" for i, c in enumerate(CASES)],
)
async def test_v2_entry_validation_answers_status_field_and_rule(
    module_app: SettingsApp,
    fields: dict[str, Any],
    status: int,
    field: str | None,
    rule: str | None,
    stored: str | None,
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    payload = {
        "name": "RMM",
        **{k: _expiry(v) if k == "expires_at" else v for k, v in fields.items()},
    }
    response = await module_app.client.post(
        module_app.url(account, "/entries"), json=payload, headers=SOC
    )
    assert response.status_code == status, response.text
    listed = (await module_app.client.get(module_app.url(account), headers=SOC)).json()
    if status == 201:
        entry = response.json()["entry"]
        assert entry["address"] == stored
        protocol = fields.get("protocol") or "any"
        assert entry["protocol"] == protocol
        assert entry["ports"] == sorted(fields.get("ports") or [])
        if fields.get("expires_at"):
            expected = datetime.fromisoformat(str(payload["expires_at"]))
            assert datetime.fromisoformat(entry["expires_at"]) == expected
        else:
            assert entry["expires_at"] is None
        assert listed["entries"] == [entry]
    else:
        got_field, got_rule, message = _error(response)
        assert (got_field, got_rule) == (field, rule), message
        assert message
        assert listed["entries"] == [] and listed["version"] == 0


# (first entry, second entry, second is covered by the first?)
COVERAGE: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    ({A: "198.51.100.7"}, {A: "198.51.100.7/32"}, True),
    ({A: "2001:db8::10"}, {A: "2001:DB8:0::10"}, True),
    ({A: "198.51.100.0/24"}, {A: "198.51.100.7"}, True),
    ({A: "198.51.100.0/24"}, {A: "198.51.100.64/26", "ports": [443], "protocol": "tcp"}, True),
    ({A: "2001:db8:1::/64"}, {A: "2001:db8:1::5", "protocol": "udp"}, True),
    ({A: OK, "protocol": "tcp"}, {A: OK, "ports": [22, 443], "protocol": "tcp"}, True),
    (
        {A: OK, "ports": [22, 443], "protocol": "tcp"},
        {A: OK, "ports": [443], "protocol": "tcp"},
        True,
    ),
    ({A: OK}, {A: OK, "expires_at": "+1h"}, True),
    ({A: OK, "expires_at": "+2h"}, {A: OK, "expires_at": "+1h"}, True),
    # not covered: wider, other protocol, more ports, other family, lives longer
    ({A: "198.51.100.7"}, {A: "198.51.100.0/24"}, False),
    ({A: OK, "protocol": "tcp"}, {A: OK, "protocol": "udp"}, False),
    ({A: OK, "protocol": "tcp"}, {A: OK}, False),
    (
        {A: OK, "ports": [443], "protocol": "tcp"},
        {A: OK, "ports": [443, 8041], "protocol": "tcp"},
        False,
    ),
    ({A: OK, "ports": [443], "protocol": "tcp"}, {A: OK, "protocol": "tcp"}, False),
    ({A: OK, "ports": [443], "protocol": "tcp"}, {A: OK, "ports": [443], "protocol": "udp"}, False),
    ({A: OK, "expires_at": "+1h"}, {A: OK}, False),
    ({A: OK, "expires_at": "+1h"}, {A: OK, "expires_at": "+2h"}, False),
    ({A: "198.51.100.0/24"}, {A: "198.51.101.0/24"}, False),
]


def _payload(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, **{k: _expiry(v) if k == "expires_at" else v for k, v in fields.items()}}


@pytest.mark.parametrize(("first", "second", "covered"), COVERAGE)
async def test_an_entry_another_covers_is_a_409_naming_the_covering_entry(
    module_app: SettingsApp, first: dict[str, Any], second: dict[str, Any], covered: bool
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    url = module_app.url(account, "/entries")
    created = await module_app.client.post(url, json=_payload("Covering", first), headers=SOC)
    assert created.status_code == 201, created.text
    response = await module_app.client.post(url, json=_payload("Second", second), headers=SOC)
    if not covered:
        assert response.status_code == 201, response.text
        return
    assert response.status_code == 409, response.text
    field, rule, message = _error(response)
    assert (field, rule) == ("address", "duplicate")
    assert "'Covering'" in message and created.json()["entry"]["id"] in message
    listed = (await module_app.client.get(module_app.url(account), headers=SOC)).json()
    assert [e["name"] for e in listed["entries"]] == ["Covering"]


async def test_patch_applies_the_same_rules_and_can_set_or_clear_v2_fields(
    module_app: SettingsApp,
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    first = await module_app.client.post(
        module_app.url(account, "/entries"), json={"name": "A", A: "198.51.100.0/24"}, headers=SOC
    )
    second = await module_app.client.post(
        module_app.url(account, "/entries"), json={"name": "B", A: "203.0.113.10"}, headers=SOC
    )
    entry_url = module_app.url(account, f"/entries/{second.json()['entry']['id']}")

    async def patch(body: dict[str, Any]) -> httpx.Response:
        return await module_app.client.patch(entry_url, json=body, headers=SOC)

    limited = await patch({"ports": [8041], "protocol": "tcp", "expires_at": _expiry("+3h")})
    assert limited.status_code == 200, limited.text
    assert limited.json()["entry"]["ports"] == [8041]
    assert limited.json()["entry"]["expires_at"] is not None
    for body, field, rule in [
        ({"protocol": "any"}, "protocol", "required_for_ports"),
        ({"ports": [0]}, "ports", "port_range"),
        ({"expires_at": _expiry("-1m")}, "expires_at", "past"),
        ({A: "2001:db8::/32"}, A, "prefix_too_wide"),
        ({A: "198.51.100.9"}, A, "duplicate"),
    ]:
        refused = await patch(body)
        assert refused.status_code in (409, 422), refused.text
        assert _error(refused)[:2] == (field, rule)
    cleared = await patch({"ports": [], "protocol": "any", "expires_at": None})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["entry"] | {"id": "", "created_at": ""} == {
        "id": "",
        "name": "B",
        "address": "203.0.113.10",
        "ports": [],
        "protocol": "any",
        "expires_at": None,
        "created_at": "",
        "created_by": cleared.json()["entry"]["created_by"],
    }
    listed = (await module_app.client.get(module_app.url(account), headers=SOC)).json()
    assert listed["version"] == 4
    assert first.status_code == 201


async def test_prefix_limits_are_configurable(
    make_settings: SettingsFactory, topics: object
) -> None:
    settings = make_settings(allowlist_max_prefix_v4=28, allowlist_max_prefix_v6=112)
    async with running_app(settings) as running:
        url = running.url("acct-limits", "/entries")
        wide = await running.client.post(url, json={"name": "x", A: "198.51.100.0/24"}, headers=SOC)
        assert wide.status_code == 422
        field, rule, message = _error(wide)
        assert (field, rule) == (A, "prefix_too_wide") and "/28" in message
        narrow = await running.client.post(
            url, json={"name": "x", A: "198.51.100.0/28"}, headers=SOC
        )
        assert narrow.status_code == 201
        v6 = await running.client.post(url, json={"name": "y", A: "2001:db8:1::/64"}, headers=SOC)
        assert v6.status_code == 422 and "/112" in _error(v6)[2]
