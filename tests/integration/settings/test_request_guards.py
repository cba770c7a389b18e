"""Settings HTTP hygiene: 413 before reading an oversized body, 401 before parsing one."""

from __future__ import annotations

from tests.integration.guards import (
    LIMIT,
    assert_problem,
    post_bad_json_unauthenticated,
    post_chunked_oversize,
    post_declared_oversize,
)
from tests.integration.settings.conftest import SOC, SettingsApp

ENTRIES = "/v1/accounts/acct-guard/tooling-allowlist/entries"


async def test_a_declared_oversize_body_gets_413_without_being_read(
    module_app: SettingsApp,
) -> None:
    response, body = await post_declared_oversize(module_app.client, ENTRIES, SOC)
    assert_problem(response, 413, f"at most {LIMIT} bytes")
    assert body.pulled == 0


async def test_a_chunked_oversize_body_is_cut_at_the_limit(module_app: SettingsApp) -> None:
    response, body = await post_chunked_oversize(module_app.client, ENTRIES, 1024 * 1024, SOC)
    assert_problem(response, 413, "request body")
    assert body.pulled <= LIMIT + body.chunk, "the server stopped reading at the limit"
    listed = await module_app.client.get("/v1/accounts/acct-guard/tooling-allowlist", headers=SOC)
    assert listed.json()["entries"] == []


async def test_bad_json_without_a_token_gets_401_not_422(module_app: SettingsApp) -> None:
    response, body = await post_bad_json_unauthenticated(module_app.client, ENTRIES)
    assert_problem(response, 401, "missing bearer token")
    assert response.headers["www-authenticate"] == "Bearer"
    assert body.pulled == 0, "the body is not read before the token is checked"


async def test_bad_json_with_a_forged_token_gets_401_not_422(module_app: SettingsApp) -> None:
    forged = {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.forged"}
    response, body = await post_bad_json_unauthenticated(module_app.client, ENTRIES, forged)
    assert_problem(response, 401, "invalid token")
    assert body.pulled == 0


async def test_public_routes_need_no_token(module_app: SettingsApp) -> None:
    for path in ("/health", "/metrics", "/openapi.json", "/portal/"):
        response = await module_app.client.get(path)
        assert response.status_code == 200, (path, response.status_code)


async def test_an_unknown_path_is_a_404_and_a_known_one_without_token_a_401(
    module_app: SettingsApp,
) -> None:
    assert (await module_app.client.get("/v1/nope")).status_code == 404
    assert_problem(await module_app.client.delete(ENTRIES), 401)
