"""mount_portal serves the static page, its runtime config and a strict CSP on any FastAPI app."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from portal import PortalConfigError, mount_portal


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://portal.test")


async def test_config_json_names_the_isolation_api() -> None:
    app = FastAPI()
    mount_portal(app, isolation_url="http://127.0.0.1:8002/")
    async with _client(app) as client:
        response = await client.get("/portal/config.json")
    assert response.status_code == 200
    assert response.json() == {"isolation_url": "http://127.0.0.1:8002", "settings_url": ""}
    assert response.headers["cache-control"] == "no-store"


async def test_page_and_assets_are_served_locally_with_a_strict_csp() -> None:
    app = FastAPI()
    mount_portal(app, isolation_url="http://127.0.0.1:8002")
    async with _client(app) as client:
        page = await client.get("/portal/")
        script = await client.get("/portal/portal.js")
        style = await client.get("/portal/portal.css")
    assert page.status_code == script.status_code == style.status_code == 200
    assert "Tooling Allowlist" in page.text
    assert "http://" not in page.text and "https://" not in page.text, "no external resources"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "connect-src 'self' http://127.0.0.1:8002" in csp
    assert page.headers["x-content-type-options"] == "nosniff"


async def test_bare_portal_path_redirects_to_the_page() -> None:
    app = FastAPI()
    mount_portal(app, isolation_url="http://127.0.0.1:8002")
    async with _client(app) as client:
        response = await client.get("/portal")
    assert response.status_code == 307
    assert response.headers["location"] == "/portal/"


async def test_routes_added_before_mounting_still_work() -> None:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    mount_portal(app, isolation_url="http://127.0.0.1:8002")
    async with _client(app) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/portal/missing.js")).status_code == 404


def test_a_relative_isolation_url_is_refused() -> None:
    with pytest.raises(PortalConfigError, match="isolation_url"):
        mount_portal(FastAPI(), isolation_url="127.0.0.1:8002")
