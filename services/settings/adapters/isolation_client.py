"""HTTP adapter for the isolation service: how many endpoints a revocation concerns."""

from __future__ import annotations

import logging

import httpx

from shared.auth import AUDIENCE_ISOLATION, SCOPE_ISOLATION_READ, service_call_token
from shared.messages import AllowlistEntry

log = logging.getLogger(__name__)


class HttpRevocationCounter:
    """``GET /v1/accounts/{a}/revocations/{r}?address=…`` on isolation, with a service token.

    Best effort within ``timeout``: the revocation is already committed and published when
    this asks, so an isolation service that is away or slow only leaves the count unknown.
    """

    def __init__(
        self,
        base_url: str,
        jwt_secret: str,
        timeout: float = 3.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._secret = jwt_secret
        self._timeout = timeout
        self._transport = transport

    async def affected(
        self, account_id: str, revocation_id: str, entry: AllowlistEntry
    ) -> int | None:
        # Only what this call needs: the isolation service's audience and the read scope.
        token = service_call_token(
            self._secret,
            sub="settings-service",
            audience=AUDIENCE_ISOLATION,
            scope=SCOPE_ISOLATION_READ,
        )
        url = f"{self._base_url}/v1/accounts/{account_id}/revocations/{revocation_id}"
        try:
            async with httpx.AsyncClient(
                timeout=self._timeout, transport=self._transport
            ) as client:
                response = await client.get(
                    url,
                    params={
                        "address": entry.address,
                        "ports": list(entry.ports),
                        "protocol": entry.protocol,
                    },
                    headers={"Authorization": f"Bearer {token}"},
                )
        except httpx.HTTPError as exc:
            log.warning(
                "could not count the endpoints of a revocation: %r",
                exc,
                extra={"account_id": account_id, "revocation_id": revocation_id},
            )
            return None
        if response.status_code != 200:
            log.warning(
                "isolation answered %s to a revocation count: %s",
                response.status_code,
                response.text[:300],
                extra={"account_id": account_id, "revocation_id": revocation_id},
            )
            return None
        try:
            return int(response.json()["endpoints"])
        except (ValueError, KeyError, TypeError):
            log.warning("isolation's revocation count is malformed: %s", response.text[:300])
            return None
