"""Hypothesis fuzzing of request bodies: never a 5xx, never an invalid entry stored."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.settings.domain import validate_address, validate_name
from tests.integration.settings.conftest import SOC, SettingsApp

ACCOUNT = "acct-fuzz"

address_like = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"\A[0-9a-fA-Fx.:/ \t\-*\[\]]{0,24}\Z"),
    st.builds(
        lambda a, b, c, d: f"{a}.{b}.{c}.{d}",
        *[st.integers(min_value=-1, max_value=300).map(str) | st.just("00")] * 4,
    ),
    st.text(max_size=30),
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
# Allowlist v2 fields: ports, protocol, expiry, well-formed or not.
v2_fields = {
    "ports": st.lists(st.integers(-2, 70000), max_size=18) | json_value,
    "protocol": st.sampled_from(["tcp", "udp", "any", "icmp", ""]) | json_value,
    "expires_at": st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.isoformat())
    | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
    | json_value,
}
entry_body = st.one_of(
    st.fixed_dictionaries({"name": st.text(max_size=80), "address": address_like}),
    st.fixed_dictionaries(
        {"name": st.text(max_size=20), "address": address_like}, optional=v2_fields
    ),
    st.fixed_dictionaries(
        {},
        optional={"name": st.text(max_size=80) | json_value, "address": address_like | json_value},
    ),
    st.dictionaries(st.text(max_size=10), json_value, max_size=4),
    json_value,
)
request = st.one_of(
    st.tuples(st.just("POST"), entry_body),
    st.tuples(st.just("PATCH-ENTRY"), entry_body),
    st.tuples(st.just("PATCH"), json_value | st.fixed_dictionaries({"enabled": json_value})),
)


def _assert_stored_state_is_valid(state: dict[str, Any]) -> None:
    keys = [(e["address"], tuple(e["ports"]), e["protocol"]) for e in state["entries"]]
    assert len(keys) == len(set(keys)) <= 100
    for entry in state["entries"]:
        assert validate_address(entry["address"]) == entry["address"]
        assert validate_name(entry["name"]) == entry["name"]
        assert entry["protocol"] in ("tcp", "udp", "any")
        assert entry["ports"] == sorted(set(entry["ports"])) and len(entry["ports"]) <= 16
        assert all(1 <= p <= 65535 for p in entry["ports"])
        assert not (entry["ports"] and entry["protocol"] == "any")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(call=request)
async def test_fuzzed_bodies_never_5xx_and_never_store_an_invalid_entry(
    module_app: SettingsApp, call: tuple[str, Any]
) -> None:
    method, body = call
    client = module_app.client
    if method == "POST":
        response = await client.post(module_app.url(ACCOUNT, "/entries"), json=body, headers=SOC)
    elif method == "PATCH-ENTRY":
        state = (await client.get(module_app.url(ACCOUNT), headers=SOC)).json()
        entry_id = state["entries"][0]["id"] if state["entries"] else "none"
        response = await client.patch(
            module_app.url(ACCOUNT, f"/entries/{entry_id}"), json=body, headers=SOC
        )
    else:
        response = await client.patch(module_app.url(ACCOUNT), json=body, headers=SOC)
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 201, 404, 409, 422), response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        errors = response.json()["errors"]
        assert isinstance(errors, list) and errors and errors[0]["field"] and errors[0]["message"]
    state = (await client.get(module_app.url(ACCOUNT), headers=SOC)).json()
    _assert_stored_state_is_valid(state)
