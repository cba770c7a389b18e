"""Operational HTTP routes every service serves (``/health``, ``/ready``, ``/metrics``) and the server runner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


def add_operational_routes(
    app: FastAPI, readiness: ReadinessCheck, registry: CollectorRegistry
) -> None:
    """``/health`` answers while the process lives; ``/ready`` only when every check passes."""

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


async def serve(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Run uvicorn in this event loop until cancelled or signalled (SIGINT/SIGTERM)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), access_log=False, lifespan="on"
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
