"""The portal's endpoint inventory in real headless Chromium: list, search, filter, pages, timeline."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.e2e.portal.conftest import ROOT
from tests.e2e.portal.fakes import FakePlatform
from tests.e2e.portal.test_portal_browser import OpenPortal, _confirm, _endpoint_row, _shot

# Endpoint, hostname, platform, minutes since the agent last polled (None: never).
FLEET = [
    ("ep-web-01", "web-01", "linux", 2),
    ("ep-web-02", "WEB-02", "linux", 4),
    ("ep-db-01", "db-01", "linux", 3),
    ("ep-fin-07", "finance-laptop-07", "windows", 9),
    ("ep-mac-03", "design-mac-03", "macos", None),
    ("ep-dc-01", "dc-01", "windows", 1),
]


def _enroll_fleet(platform: FakePlatform, account: str) -> None:
    now = datetime.now(UTC)
    for endpoint_id, hostname, system, minutes in FLEET:
        platform.register(
            f"{endpoint_id}-{account}",
            account,
            hostname=hostname,
            platform=system,
            last_seen=None if minutes is None else (now - timedelta(minutes=minutes)).isoformat(),
        )


def _row(page: Any, endpoint_id: str, account: str) -> Any:
    return _endpoint_row(page, f"{endpoint_id}-{account}")


def _hostnames(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#endpoints-body .ep-hostname").all_inner_texts()]


def test_every_enrolled_endpoint_is_listed_with_hostname_platform_and_last_seen(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    _enroll_fleet(platform, account)
    platform.register("ep-other", "acct-someone-else", hostname="web-03")
    page = open_portal("soc", account, view="endpoints", sub="soc@platform.example")
    expect(page.locator("#endpoints-body tr")).to_have_count(len(FLEET))
    # Hostname order, case-insensitive; another account's endpoint is not there.
    assert _hostnames(page) == [
        "db-01",
        "dc-01",
        "design-mac-03",
        "finance-laptop-07",
        "web-01",
        "WEB-02",
    ]
    mac = _row(page, "ep-mac-03", account)
    expect(mac.locator(".ep-platform")).to_have_text("macos")
    expect(mac.locator(".ep-last-seen")).to_have_text("Never")
    expect(mac.locator(".ep-state")).to_have_text("Not isolated")
    expect(_row(page, "ep-web-01", account).locator(".ep-last-seen")).to_have_text("2 min ago")

    # Per-row actions: isolate one standard, one strict; the list shows their state.
    web = f"ep-web-01-{account}"
    _row(page, "ep-web-01", account).get_by_role("button", name=f"Isolate {web}").click()
    _confirm(page, reason="suspicious PowerShell")
    fin = f"ep-fin-07-{account}"
    _row(page, "ep-fin-07", account).get_by_role("button", name=f"Isolate strict {fin}").click()
    _confirm(page, reason="ransomware note found")
    expect(_row(page, "ep-web-01", account).locator(".ep-state")).to_have_text("Isolated")
    expect(_row(page, "ep-fin-07", account).locator(".ep-mode")).to_have_text("strict")
    expect(_row(page, "ep-fin-07", account).locator(".ep-state")).to_have_text("Isolated")
    # A laptop-wide window for the README's picture; the timeline of the strict one is open.
    page.set_viewport_size({"width": 1480, "height": 1000})
    _row(page, "ep-fin-07", account).get_by_role("button", name=f"Timeline {fin}").click()
    expect(page.locator("#timeline-body tr")).to_have_count(1)
    expect(page.locator("#timeline-body .tl-status")).to_contain_text("Applied")
    page.evaluate("window.scrollTo(0, 0)")
    shot = _shot(page, screenshot_dir, "endpoints-inventory")
    if os.environ.get("HOSTISO_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "portal-endpoints.png")
    # Release from the row puts it back.
    _row(page, "ep-web-01", account).get_by_role("button", name=f"Release {web}").click()
    _confirm(page, reason="all clear")
    expect(_row(page, "ep-web-01", account).locator(".ep-state")).to_have_text("Not isolated")
    assert page.js_errors == []


def test_search_and_state_filter_narrow_the_list(
    open_portal: OpenPortal, platform: FakePlatform, account: str
) -> None:
    _enroll_fleet(platform, account)
    page = open_portal("partner", account, view="endpoints")
    expect(page.locator("#endpoints-body tr")).to_have_count(len(FLEET))
    page.get_by_label("Search hostname").fill("WEB")
    expect(page.locator("#endpoints-body tr")).to_have_count(2)
    assert _hostnames(page) == ["web-01", "WEB-02"]

    db = f"ep-db-01-{account}"
    page.get_by_label("Search hostname").fill("")
    expect(page.locator("#endpoints-body tr")).to_have_count(len(FLEET))
    _row(page, "ep-db-01", account).get_by_role("button", name=f"Isolate {db}").click()
    _confirm(page)
    expect(_row(page, "ep-db-01", account).locator(".ep-state")).to_have_text("Isolated")
    page.get_by_label("State").select_option("isolated")
    expect(page.locator("#endpoints-body tr")).to_have_count(1)
    assert _hostnames(page) == ["db-01"]
    page.get_by_label("Search hostname").fill("web")
    expect(page.locator("#endpoints-empty")).to_be_visible()
    assert page.js_errors == []


def test_an_isolated_endpoint_shows_how_often_each_allowed_entry_was_used(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    platform.register(f"ep-rmm-{account}", account, hostname="rmm-client")
    allowlist = platform.allowlist(account)
    allowlist.enabled = True
    allowlist.entries = [
        {
            "id": f"e-{account}-{i}",
            "name": name,
            "address": address,
            "ports": [],
            "protocol": "any",
            "expires_at": None,
            "created_at": "2026-12-01T10:00:00Z",
            "created_by": "alice",
        }
        for i, (name, address) in enumerate(
            [("Self-hosted RMM", "203.0.113.10"), ("Backup relay", "203.0.113.11")]
        )
    ]
    endpoint = f"ep-rmm-{account}"
    page = open_portal("soc", account, view="endpoints")
    _row(page, "ep-rmm", account).get_by_role("button", name=f"Isolate {endpoint}").click()
    _confirm(page, reason="incident 4711")
    expect(_row(page, "ep-rmm", account).locator(".ep-state")).to_have_text("Isolated")
    # The agent counted traffic through the RMM entry only; the backup relay was not used.
    platform.isolations[endpoint].allowlist_usage = [
        {"address": "203.0.113.10", "ports": [], "protocol": "any", "packets": 42,
         "bytes": 5120, "last_seen": "2026-12-02T01:02:03Z"},
        {"address": "203.0.113.11", "ports": [], "protocol": "any", "packets": 0,
         "bytes": 0, "last_seen": None},
    ]  # fmt: skip
    page.reload()
    row = _row(page, "ep-rmm", account)
    expect(row.locator(".usage")).to_have_count(2)
    expect(row.locator(".usage").first).to_contain_text("used 42 times, last at")
    expect(row.locator(".usage").nth(1)).to_contain_text("not used")
    # The README's picture of what the SOC sees during an incident: was the RMM channel used?
    page.set_viewport_size({"width": 1480, "height": 700})
    page.evaluate("window.scrollTo(0, 0)")
    shot = _shot(page, screenshot_dir, "endpoints-allowlist-usage")
    if os.environ.get("HOSTISO_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "portal-usage.png")
    assert page.js_errors == []


def test_pages_go_forward_and_back_through_a_large_account(
    open_portal: OpenPortal, platform: FakePlatform, account: str
) -> None:
    for i in range(30):
        platform.register(f"ep-{i:02d}-{account}", account, hostname=f"host-{i:02d}")
    page = open_portal("soc", account, view="endpoints")
    expect(page.locator("#endpoints-body tr")).to_have_count(25)
    expect(page.locator("#endpoints-prev")).to_be_disabled()
    assert _hostnames(page)[0] == "host-00"
    page.get_by_role("button", name="Next").click()
    expect(page.locator("#endpoints-body tr")).to_have_count(5)
    assert _hostnames(page) == [f"host-{i}" for i in range(25, 30)]
    expect(page.locator("#endpoints-next")).to_be_disabled()
    expect(page.locator("#endpoints-page")).to_have_text("Page 2")
    page.get_by_role("button", name="Previous").click()
    expect(page.locator("#endpoints-body tr")).to_have_count(25)
    assert _hostnames(page)[0] == "host-00"
    assert page.js_errors == []


def test_timeline_panel_shows_each_policy_with_who_why_and_the_agents_answer(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    endpoint_id = f"ep-tl-{account}"
    platform.register(endpoint_id, account, hostname="web-tl")
    page = open_portal("soc", account, view="endpoints", sub="soc@platform.example")
    row = _endpoint_row(page, endpoint_id)
    row.get_by_role("button", name=f"Timeline {endpoint_id}").click()
    panel = page.locator("#timeline-panel")
    expect(panel).to_be_visible()
    expect(panel.locator("#timeline-title")).to_have_text("Timeline of web-tl")
    expect(panel.locator("#timeline-empty")).to_be_visible()

    row.get_by_role("button", name=f"Isolate {endpoint_id}").click()
    _confirm(page, reason="incident 42")
    expect(row.locator(".ep-state")).to_have_text("Isolated")
    with platform.lock:
        platform.isolations[endpoint_id].fail_next = "nft: table busy"
    row.get_by_role("button", name=f"Release {endpoint_id}").click()
    _confirm(page, reason="all clear")

    lines = panel.locator("#timeline-body tr")
    expect(lines).to_have_count(2)
    newest, first = lines.nth(0), lines.nth(1)
    expect(newest.locator(".tl-mode")).to_have_text("release")
    expect(newest.locator(".tl-status")).to_contain_text("Failed")
    expect(newest.locator(".tl-status")).to_contain_text("nft: table busy")
    expect(newest.locator(".tl-reason")).to_have_text("all clear")
    expect(first.locator(".tl-mode")).to_have_text("standard")
    expect(first.locator(".tl-by")).to_have_text("soc@platform.example")
    expect(first.locator(".tl-reason")).to_have_text("incident 42")
    expect(first.locator(".tl-status")).to_contain_text("Applied")
    expect(row.locator(".ep-state")).to_contain_text("Failed")
    _shot(page, screenshot_dir, "endpoints-timeline")
    page.get_by_role("button", name="Close").click()
    expect(panel).to_be_hidden()
    assert page.js_errors == []
