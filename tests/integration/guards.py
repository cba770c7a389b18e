"""Helpers for the request-guard tests: bodies that count what the server pulled from them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

LIMIT = 64 * 1024


class CountingBody:
    """A streamed request body that records how many bytes the server actually read."""

    def __init__(self, total: int, chunk: int = 4096, fill: bytes = b"x") -> None:
        self.total = total
        self.chunk = chunk
        self.fill = fill
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        while sent < self.total:
            size = min(self.chunk, self.total - sent)
            sent += size
            self.pulled = sent
            yield self.fill * size


def assert_problem(response: httpx.Response, status: int, detail_part: str = "") -> None:
    """An RFC 9457 problem document with ``status`` and, if given, a detail naming the rule."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail"}, body
    assert body["status"] == status
    assert detail_part in body["detail"], body


async def post_declared_oversize(
    http: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, CountingBody]:
    """A body that declares more than the limit in Content-Length."""
    body = CountingBody(LIMIT + 1024)
    response = await http.post(
        path,
        content=body,
        headers={
            "Content-Length": str(body.total),
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )
    return response, body


async def post_chunked_oversize(
    http: httpx.AsyncClient, path: str, total: int, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, CountingBody]:
    """A chunked body (no Content-Length) of ``total`` bytes."""
    body = CountingBody(total)
    response = await http.post(
        path, content=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    assert "content-length" not in response.request.headers
    return response, body


async def post_bad_json_unauthenticated(
    http: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, CountingBody]:
    """Malformed JSON and no (or a bad) token."""
    body = CountingBody(200, fill=b"{")
    response = await http.post(
        path, content=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    return response, body
