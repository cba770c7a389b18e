"""HTTP client of the settings, isolation and enforcer REST APIs (DESIGN §4), with the CLI's error classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx


class ApiRefusedError(Exception):
    """The API answered 4xx: the request was understood and refused (detail from the API)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class ApiUnavailableError(Exception):
    """The API is unreachable, timed out or answered 5xx."""


def describe_detail(body: Any) -> str:
    """The API's error as one line.

    RFC 9457 problem details (``{title, detail, errors: [{field, rule, message}]}``, every
    service since this release); still tolerant of the older bodies for a release: FastAPI's
    ``{"detail": [{loc, msg}]}`` and ``{"detail": "text"}``.
    """
    detail = body.get("detail") if isinstance(body, dict) else body
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors:
        text = detail if isinstance(detail, str) else ""
        # Each refused field once: the detail often already says it.
        named = [
            _problem_item(e)
            for e in errors
            if not (isinstance(e, dict) and str(e.get("message") or "") in text)
        ]
        return "; ".join([p for p in (text, *named) if p])
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
                msg = str(item.get("msg", item))
                parts.append(
                    f"{'.'.join(loc)}: {msg}" if loc and not msg.startswith(loc[-1]) else msg
                )
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if detail is None:
        return ""
    return str(detail)


# The inventory's largest page, and how many pages a listing follows (at most 50,000 endpoints).
INVENTORY_PAGE = 500
MAX_INVENTORY_PAGES = 100


def _problem_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    field = str(item.get("field") or "")
    for location in ("body.", "query.", "path.", "header."):
        field = field.removeprefix(location)
    message = str(item.get("message") or item.get("rule") or "")
    return f"{field}: {message}" if field and not message.startswith(field) else message


def _q(value: str) -> str:
    return quote(value, safe="")


@dataclass
class Answer:
    """A successful answer: status, JSON body (or None) and the ETag header."""

    status: int
    body: Any
    etag: str | None


class PlatformClient:
    """Calls the settings, isolation and enforcer APIs with one bearer token."""

    def __init__(
        self,
        *,
        settings_url: str,
        isolation_url: str,
        token: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        enforcer_url: str = "http://127.0.0.1:8003",
    ) -> None:
        self.settings_url = settings_url.rstrip("/")
        self.isolation_url = isolation_url.rstrip("/")
        self.enforcer_url = enforcer_url.rstrip("/")
        self._http = httpx.Client(
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PlatformClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        if_match: str | None = None,
    ) -> Answer:
        headers = {"If-Match": if_match} if if_match else {}
        try:
            response = self._http.request(method, url, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ApiUnavailableError(f"{method} {url}: timed out ({exc})") from exc
        except httpx.TransportError as exc:
            raise ApiUnavailableError(f"{method} {url}: unreachable ({exc})") from exc
        try:
            body: Any = response.json() if response.content else None
        except ValueError:
            body = {"detail": response.text[:500]}
        if response.status_code >= 500:
            raise ApiUnavailableError(
                f"{method} {url}: {response.status_code} {describe_detail(body) or response.reason_phrase}"
            )
        if response.status_code >= 400:
            raise ApiRefusedError(
                response.status_code, describe_detail(body) or response.reason_phrase
            )
        return Answer(response.status_code, body, response.headers.get("ETag"))

    # --- settings -----------------------------------------------------------------------

    def _allowlist(self, account_id: str) -> str:
        return f"{self.settings_url}/v1/accounts/{_q(account_id)}/tooling-allowlist"

    def get_allowlist(self, account_id: str) -> Answer:
        return self._call("GET", self._allowlist(account_id))

    def set_enabled(self, account_id: str, enabled: bool, *, if_match: str | None) -> Answer:
        return self._call(
            "PATCH", self._allowlist(account_id), json={"enabled": enabled}, if_match=if_match
        )

    def add_entry(
        self,
        account_id: str,
        name: str,
        address: str,
        *,
        if_match: str | None,
        options: dict[str, Any] | None = None,
    ) -> Answer:
        """``options``: the allowlist v2 fields (ports, protocol, expires_at), only when given."""
        return self._call(
            "POST",
            f"{self._allowlist(account_id)}/entries",
            json={"name": name, "address": address, **(options or {})},
            if_match=if_match,
        )

    def rename_entry(
        self, account_id: str, entry_id: str, name: str, *, if_match: str | None
    ) -> Answer:
        return self._call(
            "PATCH",
            f"{self._allowlist(account_id)}/entries/{_q(entry_id)}",
            json={"name": name},
            if_match=if_match,
        )

    def remove_entry(self, account_id: str, entry_id: str, *, if_match: str | None) -> Answer:
        return self._call(
            "DELETE", f"{self._allowlist(account_id)}/entries/{_q(entry_id)}", if_match=if_match
        )

    def revoke_entry(self, account_id: str, entry_id: str, *, reason: str) -> Answer:
        return self._call(
            "POST",
            f"{self._allowlist(account_id)}/entries/{_q(entry_id)}/revoke",
            json={"reason": reason},
        )

    # --- isolation ----------------------------------------------------------------------

    def refresh(self, endpoint_id: str, *, reason: str) -> Answer:
        return self._call(
            "POST", f"{self._isolation(endpoint_id)}/refresh", json={"reason": reason}
        )

    def revocation_progress(
        self, account_id: str, revocation_id: str, entry: dict[str, Any]
    ) -> dict[str, Any]:
        query = urlencode(
            [("address", str(entry.get("address", "")))]
            + [("ports", str(p)) for p in entry.get("ports") or []]
            + [("protocol", str(entry.get("protocol") or "any"))]
        )
        body = self._call(
            "GET",
            f"{self.isolation_url}/v1/accounts/{_q(account_id)}/revocations/"
            f"{_q(revocation_id)}?{query}",
        ).body
        return body if isinstance(body, dict) else {}

    def _isolation(self, endpoint_id: str) -> str:
        return f"{self.isolation_url}/v1/endpoints/{_q(endpoint_id)}/isolation"

    def isolate(self, endpoint_id: str, *, mode: str, reason: str) -> Answer:
        return self._call(
            "POST", self._isolation(endpoint_id), json={"mode": mode, "reason": reason}
        )

    def release(self, endpoint_id: str) -> Answer:
        return self._call("DELETE", self._isolation(endpoint_id))

    def strict_account(self, account_id: str, *, reason: str, disable_allowlist: bool) -> Answer:
        return self._call(
            "POST",
            f"{self.isolation_url}/v1/accounts/{_q(account_id)}/strict-isolation",
            json={"reason": reason, "disable_allowlist": disable_allowlist},
        )

    def get_isolation(self, endpoint_id: str) -> dict[str, Any]:
        body = self._call("GET", self._isolation(endpoint_id)).body
        return body if isinstance(body, dict) else {}

    def list_isolations(self, account_id: str) -> list[dict[str, Any]]:
        body = self._call(
            "GET", f"{self.isolation_url}/v1/accounts/{_q(account_id)}/isolations"
        ).body
        return isolation_rows(body)

    def list_endpoints(
        self,
        account_id: str,
        *,
        state: str | None = None,
        q: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Answer:
        """One page of the account's inventory (every enrolled endpoint)."""
        params = {
            name: str(value)
            for name, value in (("state", state), ("q", q), ("limit", limit), ("cursor", cursor))
            if value is not None
        }
        url = httpx.URL(
            f"{self.isolation_url}/v1/accounts/{_q(account_id)}/endpoints", params=params
        )
        return self._call("GET", str(url))

    def all_endpoints(
        self, account_id: str, *, state: str | None = None, q: str | None = None
    ) -> list[dict[str, Any]]:
        """Every page of the inventory, followed through ``next_cursor``."""
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_INVENTORY_PAGES):
            body = self.list_endpoints(
                account_id, state=state, q=q, limit=INVENTORY_PAGE, cursor=cursor
            ).body
            if not isinstance(body, dict):
                break
            rows += [row for row in body.get("items") or [] if isinstance(row, dict)]
            cursor = body.get("next_cursor")
            if not isinstance(cursor, str) or not cursor:
                break
        return rows

    def isolation_timeline(self, endpoint_id: str, *, limit: int | None = None) -> Answer:
        url = httpx.URL(
            f"{self._isolation(endpoint_id)}/timeline",
            params={} if limit is None else {"limit": str(limit)},
        )
        return self._call("GET", str(url))

    # --- enforcer: enrollment keys -------------------------------------------------------

    def _enrollment_keys(self, account_id: str) -> str:
        return f"{self.enforcer_url}/v1/accounts/{_q(account_id)}/enrollment-keys"

    def list_enrollment_keys(self, account_id: str) -> Answer:
        return self._call("GET", self._enrollment_keys(account_id))

    def rotate_enrollment_key(self, account_id: str) -> Answer:
        return self._call("POST", self._enrollment_keys(account_id))

    def revoke_enrollment_key(self, account_id: str, key_id: str) -> Answer:
        return self._call("DELETE", f"{self._enrollment_keys(account_id)}/{_q(key_id)}")


def isolation_rows(body: Any) -> list[dict[str, Any]]:
    """The list of isolations, whether the API answers a bare list or wraps it in an object."""
    if isinstance(body, list):
        return [row for row in body if isinstance(row, dict)]
    if isinstance(body, dict):
        for key in ("isolations", "endpoints", "items"):
            if isinstance(body.get(key), list):
                return [row for row in body[key] if isinstance(row, dict)]
    return []
