"""Browser fixtures: the system Chromium driven by Playwright, and the fake APIs serving the portal."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.auth import mint_token
from shared.messages import Role
from tests.e2e.portal.fakes import JWT_SECRET, FakePlatform, ServerThread, start_fake_stack

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = Path(os.environ.get("HOSTISO_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    path = Path(os.environ.get("HOSTISO_SCREENSHOT_DIR", ROOT / "artifacts" / "screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def platform() -> FakePlatform:
    return FakePlatform()


@pytest.fixture(scope="module")
def stack(platform: FakePlatform) -> Iterator[tuple[ServerThread, ServerThread]]:
    settings, isolation = start_fake_stack(platform)
    try:
        yield settings, isolation
    finally:
        settings.stop()
        isolation.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def account() -> str:
    return f"acct-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def open_portal(
    browser: Any, stack: tuple[ServerThread, ServerThread]
) -> Iterator[Callable[..., Any]]:
    """Open the portal in a fresh browser context signed in with a token of the given role."""
    contexts: list[Any] = []
    settings, _ = stack

    def _open(role: Role, account_id: str | None, view: str = "allowlist", sub: str = "") -> Any:
        token = mint_token(
            JWT_SECRET, sub=sub or f"{role}@msp.example", role=role, account_id=account_id
        )
        context = browser.new_context(viewport={"width": 1360, "height": 860})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: errors.append(msg.text) if msg.type == "error" else None,
        )
        page.js_errors = errors
        page.goto(f"{settings.url}/portal/#/{view}")
        page.get_by_label("API token (JWT)").fill(token)
        page.get_by_role("button", name="Use token").click()
        if role != "partner" and account_id:
            page.locator("#account-input").fill(account_id)
            page.locator("#account-input").press("Enter")
        return page

    yield _open
    for context in contexts:
        context.close()
