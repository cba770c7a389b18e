"""HTTP adapter for the settings service: switch an account's allowlist off (compromised RMM)."""

from __future__ import annotations

import logging

import httpx

from services.isolation.handlers import SettingsRefusedError
from shared.auth import AUDIENCE_SETTINGS, SCOPE_ALLOWLIST_WRITE, service_call_token
from shared.messages import Actor

log = logging.getLogger(__name__)


class SettingsUnavailableError(Exception):
    """The settings service did not confirm the change; the caller retries."""


class HttpSettingsClient:
    """``PATCH /v1/accounts/{id}/tooling-allowlist {"enabled": false}`` with a service token."""

    def __init__(
        self,
        base_url: str,
        jwt_secret: str,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._secret = jwt_secret
        self._timeout = timeout
        self._transport = transport

    async def disable_allowlist(self, account_id: str, requested_by: Actor) -> None:
        # Only what this call needs: the settings service's audience and the write scope.
        token = service_call_token(
            self._secret,
            sub="isolation-service",
            audience=AUDIENCE_SETTINGS,
            scope=SCOPE_ALLOWLIST_WRITE,
        )
        url = f"{self._base_url}/v1/accounts/{account_id}/tooling-allowlist"
        try:
            async with httpx.AsyncClient(
                timeout=self._timeout, transport=self._transport
            ) as client:
                response = await client.patch(
                    url,
                    json={"enabled": False},
                    headers={
                        "Authorization": f"Bearer {token}",
                        "X-Requested-By": requested_by.sub,
                    },
                )
        except httpx.HTTPError as exc:
            raise SettingsUnavailableError(f"settings service unreachable: {exc!r}") from exc
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            raise SettingsRefusedError(
                f"settings service refused ({response.status_code}): {response.text[:300]}"
            )
        if response.status_code >= 300:
            raise SettingsUnavailableError(
                f"settings service answered {response.status_code}: {response.text[:300]}"
            )
        log.info("allowlist switched off", extra={"account_id": account_id})
