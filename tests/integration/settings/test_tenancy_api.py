"""Tenancy (guarantee 8): every route, role and own or other account; 401 for bad tokens; 403 audited."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest

from shared.auth import (
    AUDIENCE_ISOLATION,
    SCOPE_ALLOWLIST_READ,
    SCOPE_ALLOWLIST_WRITE,
    SCOPE_ENROLLMENT_KEY_READ,
    mint_token,
)
from shared.config import DEV_JWT_SECRET
from shared.messages import AuditRecorded, Role
from tests.helpers import read_topic, wait_for
from tests.integration.settings.conftest import SOC, SettingsApp, bearer

# (route name, method, path suffix after /v1/accounts/{id}, json body, success status)
ROUTES: list[tuple[str, str, str, dict[str, Any] | None, int]] = [
    ("read", "GET", "/tooling-allowlist", None, 200),
    ("switch", "PATCH", "/tooling-allowlist", {"enabled": True}, 200),
    ("add", "POST", "/tooling-allowlist/entries", {"name": "RMM", "address": "10.9.9.9"}, 201),
    ("rename", "PATCH", "/tooling-allowlist/entries/{entry}", {"name": "Renamed"}, 200),
    ("remove", "DELETE", "/tooling-allowlist/entries/{entry}", None, 200),
    ("history", "GET", "/tooling-allowlist/history", None, 200),
    ("enrollment-key", "GET", "/enrollment-key", None, 410),
]
# The scope a service token needs for each route (partner and soc tokens are not scoped).
SCOPE = {
    "read": SCOPE_ALLOWLIST_READ,
    "switch": SCOPE_ALLOWLIST_WRITE,
    "add": SCOPE_ALLOWLIST_WRITE,
    "rename": SCOPE_ALLOWLIST_WRITE,
    "remove": SCOPE_ALLOWLIST_WRITE,
    "history": SCOPE_ALLOWLIST_READ,
    "enrollment-key": SCOPE_ENROLLMENT_KEY_READ,
}
ROLES: list[Role] = ["partner", "soc", "service"]


async def _prepare(app: SettingsApp) -> tuple[str, str]:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    created = await app.add(account, "Existing", "10.1.1.1")
    assert created.status_code == 201
    return account, created.json()["entry"]["id"]


async def _call(
    app: SettingsApp, route: tuple[str, str, str, Any, int], account: str, entry: str, headers: Any
) -> Any:
    _, method, suffix, body, _ = route
    url = f"/v1/accounts/{account}" + suffix.format(entry=entry)
    return await app.client.request(method, url, json=body, headers=headers)


@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("whose", ["own", "other"])
async def test_route_role_account_matrix(
    module_app: SettingsApp, route: tuple[str, str, str, Any, int], role: Role, whose: str
) -> None:
    account, entry = await _prepare(module_app)
    token_account = None
    if role == "partner":
        token_account = account if whose == "own" else f"acct-{uuid.uuid4().hex[:8]}"
    scopes = (SCOPE[route[0]],) if role == "service" else ()
    response = await _call(
        module_app, route, account, entry, bearer(role, token_account, scopes=scopes)
    )
    before = (await module_app.client.get(module_app.url(account), headers=SOC)).json()
    if role == "partner" and whose == "other":
        assert response.status_code == 403, response.text
        [error] = response.json()["errors"]
        assert error["field"] == "path.account_id"
        assert "may not access account" in error["message"]
        assert before["version"] == 1, "a refused write must change nothing"
    else:
        assert response.status_code == route[4], response.text
        if route[1] != "GET":
            assert before["version"] == 2
        if route[0] == "enrollment-key":
            assert "enrollment_key" not in response.json()


def _bad_tokens() -> dict[str, dict[str, str]]:
    now = int(time.time())
    expired = jwt.encode(
        {"sub": "x", "role": "soc", "iat": now - 100, "exp": now - 10}, DEV_JWT_SECRET, "HS256"
    )
    forged = mint_token("another-secret-that-is-long-enough-000000", sub="x", role="soc")
    no_account = jwt.encode({"sub": "x", "role": "partner", "exp": now + 60}, DEV_JWT_SECRET)
    bad_role = jwt.encode({"sub": "x", "role": "admin", "exp": now + 60}, DEV_JWT_SECRET)

    def signed(**claims: Any) -> str:
        base = {"sub": "x", "role": "soc", "iat": now, "exp": now + 60, "aud": ["hostiso-settings"]}
        return jwt.encode({**base, **claims}, DEV_JWT_SECRET, "HS256")

    century = signed(exp=now + 100 * 365 * 86400)
    no_iat = jwt.encode(
        {"sub": "x", "role": "soc", "exp": now + 60, "aud": "hostiso-settings"}, DEV_JWT_SECRET
    )
    no_aud = jwt.encode({"sub": "x", "role": "soc", "iat": now, "exp": now + 60}, DEV_JWT_SECRET)
    other_aud = mint_token(DEV_JWT_SECRET, sub="x", role="soc", audience=[AUDIENCE_ISOLATION])
    future = signed(iat=now + 3600, exp=now + 3700)
    long_service = signed(
        role="service", exp=now + 2 * 3600, scope="allowlist:read allowlist:write"
    )
    return {
        "century-exp": {"Authorization": f"Bearer {century}"},
        "no-iat": {"Authorization": f"Bearer {no_iat}"},
        "no-aud": {"Authorization": f"Bearer {no_aud}"},
        "other-audience": {"Authorization": f"Bearer {other_aud}"},
        "future-iat": {"Authorization": f"Bearer {future}"},
        "long-lived-service": {"Authorization": f"Bearer {long_service}"},
        "missing": {},
        "not-bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "garbage": {"Authorization": "Bearer not.a.jwt"},
        "expired": {"Authorization": f"Bearer {expired}"},
        "forged": {"Authorization": f"Bearer {forged}"},
        "partner-without-account": {"Authorization": f"Bearer {no_account}"},
        "unknown-role": {"Authorization": f"Bearer {bad_role}"},
    }


@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
@pytest.mark.parametrize("kind", list(_bad_tokens()))
async def test_missing_expired_or_forged_tokens_get_401(
    module_app: SettingsApp, route: tuple[str, str, str, Any, int], kind: str
) -> None:
    response = await _call(module_app, route, "acct-401", "e", _bad_tokens()[kind])
    assert response.status_code == 401, response.text
    assert isinstance(response.json()["detail"], str)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"


# Each JWT rule is named in the refusal (finding: 100-year exp accepted, no aud, unscoped service).
RULES = {
    "century-exp": "lifetime (exp - iat) of 3153600000s exceeds the maximum of 86400s for role 'soc'",
    "no-iat": "the iat claim is required",
    "no-aud": "the aud claim is required",
    "other-audience": "aud must include 'hostiso-settings'",
    "future-iat": "iat is in the future",
    "long-lived-service": "exceeds the maximum of 3600s for role 'service'",
}


@pytest.mark.parametrize("kind", list(RULES))
async def test_each_jwt_rule_is_named_in_the_401(module_app: SettingsApp, kind: str) -> None:
    response = await module_app.client.get(module_app.url("acct-jwt"), headers=_bad_tokens()[kind])
    assert response.status_code == 401, response.text
    assert RULES[kind] in response.json()["detail"]


async def test_a_service_token_may_do_only_what_its_scope_names(module_app: SettingsApp) -> None:
    account, _ = await _prepare(module_app)
    unscoped = bearer("service")
    assert (
        await module_app.client.get(module_app.url(account), headers=unscoped)
    ).status_code == 403
    writer = bearer("service", scopes=(SCOPE_ALLOWLIST_WRITE,))
    switched = await module_app.client.patch(
        module_app.url(account), json={"enabled": False}, headers=writer
    )
    assert switched.status_code == 200, switched.text
    key = await module_app.client.get(f"/v1/accounts/{account}/enrollment-key", headers=writer)
    assert key.status_code == 403
    assert "'enrollment-key:read' scope" in key.json()["detail"]
    assert 'error="insufficient_scope"' in key.headers["www-authenticate"]


async def test_refused_cross_account_attempt_is_in_the_audit_topic(
    module_app: SettingsApp, kafka_bootstrap: str
) -> None:
    victim = f"acct-{uuid.uuid4().hex[:8]}"
    response = await module_app.client.post(
        module_app.url(victim, "/entries"),
        json={"name": "evil", "address": "not even valid"},
        headers=bearer("partner", "acct-attacker", sub="mallory"),
    )
    assert response.status_code == 403, "tenancy is decided before the body is looked at"

    async def denied() -> list[AuditRecorded]:
        records = await read_topic(kafka_bootstrap, module_app.topics, module_app.topics.audit)
        return [r for r in records if r.account_id == victim and r.outcome == "denied"]

    [record] = await wait_for(denied, timeout=20, message="denied audit record")
    assert record.actor.sub == "mallory" and record.actor.account_id == "acct-attacker"
    assert record.action == "allowlist.entry.add"


async def test_changes_and_rejections_are_audited_on_the_audit_topic(
    module_app: SettingsApp, kafka_bootstrap: str
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    assert (await module_app.add(account, "RMM", "10.2.2.2")).status_code == 201
    assert (await module_app.add(account, "Dup", "10.2.2.2")).status_code == 409
    assert (await module_app.add(account, "Bad", "10.2")).status_code == 422
    stale = await module_app.client.patch(
        module_app.url(account), json={"enabled": True}, headers={**SOC, "If-Match": '"0"'}
    )
    assert stale.status_code == 412

    async def audited() -> list[AuditRecorded] | None:
        records = await read_topic(kafka_bootstrap, module_app.topics, module_app.topics.audit)
        mine = [r for r in records if r.account_id == account]
        return mine if len(mine) >= 4 else None

    records = await wait_for(audited, timeout=20, message="audit records")
    outcomes = sorted((r.action, r.outcome) for r in records)
    assert outcomes == [
        ("allowlist.enable", "rejected"),
        ("allowlist.entry.add", "ok"),
        ("allowlist.entry.add", "rejected"),
        ("allowlist.entry.add", "rejected"),
    ]
    ok = next(r for r in records if r.outcome == "ok")
    assert ok.before == {"enabled": False, "version": 0, "entries": []}
    assert ok.after is not None and ok.after["entries"][0]["address"] == "10.2.2.2"
