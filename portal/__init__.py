"""The partner/SOC portal: a static page (no build step, no CDN) mounted on a FastAPI app."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
PORTAL_PATH = "/portal"


class PortalConfigError(ValueError):
    """The isolation API URL given to the portal is not an absolute http(s) URL."""


def _origin(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PortalConfigError(f"isolation_url must be an absolute http(s) URL, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(isolation_url: str) -> str:
    """The page may only load its own files and call its own origin and the isolation API."""
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' {_origin(isolation_url)}",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )


class _PortalFiles(StaticFiles):
    """Static files with a strict CSP: the page holds a bearer token, so no foreign script may run."""

    def __init__(self, *, directory: Path, csp: str) -> None:
        super().__init__(directory=directory, html=True)
        self._csp = csp

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = self._csp
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        # The page changes with the services it talks to; never serve a stale script.
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_portal(app: FastAPI, *, isolation_url: str, settings_url: str = "") -> None:
    """Serve the portal at ``/portal/`` and its runtime configuration at ``/portal/config.json``.

    ``settings_url`` defaults to the page's own origin (the settings service serves the portal).
    """
    isolation_base = isolation_url.rstrip("/")
    settings_base = settings_url.rstrip("/")
    csp = content_security_policy(isolation_base)
    if settings_base:
        csp = csp.replace("connect-src 'self'", f"connect-src 'self' {_origin(settings_base)}")
    config = {"isolation_url": isolation_base, "settings_url": settings_base}

    # Routes are matched in order: these two must precede the static mount that would shadow them.
    async def portal_config() -> JSONResponse:
        return JSONResponse(config, headers={"Cache-Control": "no-store"})

    async def portal_redirect() -> RedirectResponse:
        return RedirectResponse(f"{PORTAL_PATH}/", status_code=307)

    app.add_api_route(
        f"{PORTAL_PATH}/config.json",
        portal_config,
        methods=["GET"],
        include_in_schema=False,
        name="portal_config",
    )
    app.add_api_route(
        PORTAL_PATH, portal_redirect, methods=["GET"], include_in_schema=False, name="portal_root"
    )
    app.mount(PORTAL_PATH, _PortalFiles(directory=STATIC_DIR, csp=csp), name="portal")
