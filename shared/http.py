"""Operational HTTP routes every service serves (``/health``, ``/ready``, ``/metrics``) and the server runner."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from shared import tracing

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


def add_operational_routes(
    app: FastAPI, readiness: ReadinessCheck, registry: CollectorRegistry
) -> None:
    """``/health`` answers while the process lives; ``/ready`` only when every check passes.

    Also counts every request by route template and status (``hostiso_http_requests_*``) and,
    with tracing on, opens a server span per request.
    """
    app.add_middleware(RequestObservability, registry=registry)

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    async def ready() -> JSONResponse:
        checks = await readiness()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestObservability:
    """ASGI middleware: request counts and durations by route template, and a span per request.

    Labelled by the matched route's template (``/v1/endpoints/{endpoint_id}/isolation``), never
    the raw path, so ids do not explode the series; unmatched paths share one label.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "hostiso_http_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "hostiso_http_request_seconds",
            "HTTP request duration by route template and method",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not tracing.enabled():
            await self._observe(scope, receive, send, None)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        with tracing.server_span(scope["method"], scope["path"], headers) as span:
            await self._observe(scope, receive, send, span)

    async def _observe(self, scope: Scope, receive: Receive, send: Send, span: Any) -> None:
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            method = scope["method"]
            self.requests.labels(route, method, str(status)).inc()
            self.seconds.labels(route, method).observe(time.perf_counter() - started)
            if span is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)


async def serve(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "warning",
    *,
    ssl_certfile: str | os.PathLike[str] | None = None,
    ssl_keyfile: str | os.PathLike[str] | None = None,
) -> None:
    """Run uvicorn in this event loop until cancelled or signalled (SIGINT/SIGTERM).

    With ``ssl_certfile`` and ``ssl_keyfile`` it serves HTTPS only (the enforcer's agent API).
    """
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("serve: ssl_certfile and ssl_keyfile go together")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
        lifespan="on",
        # Long polls hold requests for up to a minute; on SIGTERM they are cut after a short
        # grace (agents simply poll again) instead of delaying the shutdown until they end.
        timeout_graceful_shutdown=3,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    server = uvicorn.Server(config)
    await server.serve()


async def with_timeout(check: Awaitable[object], timeout: float = 2.0) -> bool:
    """True if ``check`` completes without error within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(check, timeout)
    except (TimeoutError, OSError, ConnectionError) as exc:
        logging.getLogger(__name__).info("readiness check failed: %s", exc)
        return False
    except Exception as exc:  # a readiness probe must answer, whatever the client raised
        logging.getLogger(__name__).warning("readiness check error: %r", exc)
        return False
    return True
