"""The HTTP adapter that switches an account's allowlist off through the settings API."""

from __future__ import annotations

import httpx
import pytest

from services.isolation.adapters.settings_client import HttpSettingsClient, SettingsUnavailableError
from services.isolation.handlers import SettingsRefusedError
from shared.auth import AUDIENCE_SETTINGS, SCOPE_ALLOWLIST_WRITE, TokenPolicy, decode_token
from shared.messages import Actor

SECRET = "a-test-secret-that-is-long-enough-0123456789"
SOC = Actor(sub="soc", role="soc")


async def test_disable_allowlist_patches_enabled_false_with_a_service_token() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"enabled": False, "version": 4})

    client = HttpSettingsClient("http://settings/", SECRET, transport=httpx.MockTransport(answer))
    await client.disable_allowlist("acct-1", SOC)
    (request,) = seen
    assert request.method == "PATCH"
    assert request.url.path == "/v1/accounts/acct-1/tooling-allowlist"
    assert request.read() == b'{"enabled":false}'
    principal = decode_token(
        TokenPolicy(SECRET, audience=AUDIENCE_SETTINGS),
        request.headers["Authorization"].removeprefix("Bearer "),
    )
    assert (principal.role, principal.sub) == ("service", "isolation-service")
    assert principal.scopes == {SCOPE_ALLOWLIST_WRITE}, "only what switching the list off needs"


@pytest.mark.parametrize(
    ("status", "error"),
    [(403, SettingsRefusedError), (429, SettingsUnavailableError), (503, SettingsUnavailableError)],
)
async def test_refusal_is_final_and_outage_is_retried(status: int, error: type[Exception]) -> None:
    client = HttpSettingsClient(
        "http://settings",
        SECRET,
        transport=httpx.MockTransport(lambda r: httpx.Response(status, text="nope")),
    )
    with pytest.raises(error, match=str(status)):
        await client.disable_allowlist("acct-1", SOC)


async def test_unreachable_settings_service_is_reported_for_a_retry() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = HttpSettingsClient("http://settings", SECRET, transport=httpx.MockTransport(refuse))
    with pytest.raises(SettingsUnavailableError, match="unreachable"):
        await client.disable_allowlist("acct-1", SOC)
