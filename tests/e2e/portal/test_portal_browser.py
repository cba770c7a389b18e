"""The portal in real headless Chromium against fakes of the settings and isolation APIs (DESIGN §4)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.e2e.portal.conftest import ROOT
from tests.e2e.portal.fakes import FakePlatform

OpenPortal = Callable[..., Any]


def _shot(page: Any, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    return path


def _add_entry(page: Any, name: str, address: str) -> None:
    page.get_by_label("Display name").fill(name)
    page.get_by_label("IPv4 address").fill(address)
    page.get_by_role("button", name="Add entry").click()


def _endpoint_row(page: Any, endpoint_id: str) -> Any:
    return page.locator(f'tr[data-endpoint-id="{endpoint_id}"]')


def _confirm(page: Any, reason: str = "") -> None:
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    if reason:
        dialog.get_by_label("Reason").fill(reason)
    dialog.locator("#confirm-ok").click()
    expect(dialog).to_be_hidden()


def _isolate(page: Any, endpoint_id: str, action: str) -> None:
    _endpoint_row(page, endpoint_id).get_by_role("button", name=f"{action} {endpoint_id}").click()
    _confirm(page, reason=f"{action} from the browser test")


def _look_up(page: Any, endpoint_id: str) -> None:
    # Every enrolled endpoint of the account is listed (the inventory): no look-up by id.
    expect(_endpoint_row(page, endpoint_id)).to_be_visible()


def test_switch_is_off_by_default_and_toggles_with_if_match(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    page = open_portal("partner", account)
    switch = page.get_by_role("switch", name="Tooling Connections")
    expect(switch).to_have_attribute("aria-checked", "false")
    expect(page.locator("#switch-state")).to_have_text("Off")
    expect(page.get_by_role("note")).to_contain_text("only endpoints isolated afterwards")
    expect(page.get_by_role("note")).to_contain_text("Cloud RMMs are not supported")

    switch.click()

    expect(switch).to_have_attribute("aria-checked", "true")
    expect(page.locator("#switch-state")).to_have_text("On")
    assert platform.allowlist(account).enabled is True
    assert platform.if_match_seen[-1] == '"0"', "the write carries the version it was based on"
    expect(page.locator("#allowlist-meta")).to_contain_text("settings version 1")
    _shot(page, screenshot_dir, "allowlist-switch-on")
    assert page.js_errors == []


def test_valid_entry_is_added_and_listed_with_who_and_when(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    page = open_portal("partner", account, sub="alice@msp.example")
    _add_entry(page, "ConnectWise Automate", "203.0.113.10")

    row = page.locator("#entries-body tr").filter(has_text="203.0.113.10")
    expect(row).to_contain_text("ConnectWise Automate")
    expect(row).to_contain_text("alice@msp.example")
    expect(page.get_by_label("Display name")).to_have_value("")
    assert [e["address"] for e in platform.allowlist(account).entries] == ["203.0.113.10"]

    _add_entry(page, "Kaseya VSA", "198.51.100.7")
    _add_entry(page, "NinjaOne relay", "10.20.30.40")
    # Allowlist v2: an IPv6 vendor tool, TCP 8041 only, for a week.
    page.get_by_label("Protocol").select_option("tcp")
    page.get_by_label("Ports (optional, TCP/UDP)").fill("8041")
    page.get_by_label("Expires (optional)").fill(
        (datetime.now() + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M")
    )
    _add_entry(page, "Vendor tool", "2001:db8::10")
    expect(page.locator("#entries-body tr")).to_have_count(4)
    vendor = page.locator("#entries-body tr").filter(has_text="2001:db8::10")
    expect(vendor).to_contain_text("TCP port 8041")
    expect(vendor).to_contain_text("until")
    added = platform.allowlist(account).entries[-1]
    assert (added["ports"], added["protocol"]) == ([8041], "tcp")
    assert added["expires_at"] is not None and added["expires_at"].endswith("Z")
    assert platform.allowlist(account).entries[0]["protocol"] == "any"
    expect(page.get_by_label("Protocol")).to_have_value("any")
    page.get_by_role("switch", name="Tooling Connections").click()
    expect(page.locator("#switch-state")).to_have_text("On")
    shot = _shot(page, screenshot_dir, "allowlist")
    if os.environ.get("HOSTISO_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "portal.png")
    assert page.js_errors == []


def test_hostname_shows_the_cloud_rmm_message_inline(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    page = open_portal("partner", account)
    _add_entry(page, "Cloud RMM", "rmm.vendor.example")

    address = page.get_by_label("IPv4 address")
    expect(page.locator("#entry-address-error")).to_contain_text(
        "cloud RMMs with dynamic addresses are not supported"
    )
    expect(address).to_have_attribute("aria-invalid", "true")
    expect(address).to_be_focused()
    expect(page.locator("#entry-name-error")).to_be_hidden()
    assert platform.allowlist(account).entries == []
    _shot(page, screenshot_dir, "allowlist-hostname-error")


def test_zero_address_shows_its_own_message_inline(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    page = open_portal("partner", account)
    _add_entry(page, "Nothing", "0.0.0.0")

    expect(page.locator("#entry-address-error")).to_contain_text("0.0.0.0/8")
    assert platform.allowlist(account).entries == []

    # Fixing the address clears the error and adds the entry.
    page.get_by_label("IPv4 address").fill("192.0.2.44")
    page.get_by_role("button", name="Add entry").click()
    expect(page.locator("#entry-address-error")).to_be_hidden()
    expect(page.get_by_label("IPv4 address")).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#entries-body tr")).to_have_count(1)
    _shot(page, screenshot_dir, "allowlist-zero-fixed")


def test_duplicate_and_bad_name_errors_are_inline_and_rename_remove_work(
    open_portal: OpenPortal, platform: FakePlatform, account: str
) -> None:
    page = open_portal("partner", account)
    _add_entry(page, "Primary RMM", "203.0.113.20")
    expect(page.locator("#entries-body tr")).to_have_count(1)
    _add_entry(page, "Again", "203.0.113.20")
    expect(page.locator("#entry-address-error")).to_contain_text("already in the allowlist")
    page.get_by_label("IPv4 address").fill("203.0.113.21")
    page.get_by_label("Display name").fill("   ")
    page.get_by_role("button", name="Add entry").click()
    expect(page.locator("#entry-name-error")).to_contain_text("1–64 printable characters")

    page.get_by_role("button", name="Rename Primary RMM").click()
    page.get_by_label("New name for 203.0.113.20").fill("x" * 80)
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#entries-body .field-error")).to_contain_text("1–64")
    page.get_by_label("New name for 203.0.113.20").fill("Datacenter RMM")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#entries-body tr").first).to_contain_text("Datacenter RMM")
    assert platform.allowlist(account).entries[0]["name"] == "Datacenter RMM"

    page.get_by_role("button", name="Remove Datacenter RMM").click()
    _confirm(page)
    expect(page.locator("#entries-empty")).to_be_visible()
    assert platform.allowlist(account).entries == []


def test_stale_version_is_refused_and_the_page_reloads(
    open_portal: OpenPortal, platform: FakePlatform, account: str
) -> None:
    page = open_portal("partner", account)
    expect(page.locator("#allowlist-meta")).to_contain_text("settings version 0")
    # Someone else changes the allowlist after the page read it.
    with platform.lock:
        other = platform.allowlist(account)
        other.enabled = True
        platform.bump(other)

    page.get_by_role("switch", name="Tooling Connections").click()

    expect(page.locator("#banner")).to_contain_text("changed elsewhere")
    expect(page.locator("#allowlist-meta")).to_contain_text("settings version 1")
    expect(page.get_by_role("switch", name="Tooling Connections")).to_have_attribute(
        "aria-checked", "true"
    )
    assert platform.allowlist(account).version == 1, "the stale write changed nothing"


def test_isolated_endpoint_keeps_its_frozen_allowlist_after_a_settings_change(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    platform.register("ep-frozen-1", account)
    platform.register("ep-frozen-2", account)
    page = open_portal("partner", account)
    page.get_by_role("switch", name="Tooling Connections").click()
    expect(page.locator("#switch-state")).to_have_text("On")
    _add_entry(page, "RMM A", "203.0.113.30")
    expect(page.locator("#entries-body tr")).to_have_count(1)

    page.get_by_role("link", name="Endpoints & Isolation").click()
    _look_up(page, "ep-frozen-1")
    _isolate(page, "ep-frozen-1", "Isolate")
    row = _endpoint_row(page, "ep-frozen-1")
    expect(row.locator(".ep-state")).to_have_text("Isolated")
    expect(row.locator(".ep-allowlist")).to_have_text("RMM A 203.0.113.30")
    frozen_version = row.locator(".ep-settings-version").inner_text()
    assert frozen_version == "2"

    page.get_by_role("link", name="Tooling Allowlist").click()
    _add_entry(page, "RMM B", "203.0.113.31")
    expect(page.locator("#entries-body tr")).to_have_count(2)

    page.get_by_role("link", name="Endpoints & Isolation").click()
    expect(row.locator(".ep-allowlist")).to_have_text("RMM A 203.0.113.30")
    expect(row.locator(".ep-settings-version")).to_have_text(frozen_version)
    # An endpoint isolated after the change gets the new list.
    _look_up(page, "ep-frozen-2")
    _isolate(page, "ep-frozen-2", "Isolate")
    newer = _endpoint_row(page, "ep-frozen-2")
    expect(newer.locator(".ep-allowlist")).to_contain_text("RMM B")
    expect(newer.locator(".ep-settings-version")).to_have_text("3")
    expect(row.locator(".ep-allowlist")).not_to_contain_text("RMM B")
    _shot(page, screenshot_dir, "endpoints-frozen")
    assert page.js_errors == []


def test_strict_wins_and_a_partner_cannot_release_it(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    platform.register("ep-strict-1", account)
    with platform.lock:
        allowlist = platform.allowlist(account)
        allowlist.enabled = True
        allowlist.entries.append(
            {
                "id": "e1",
                "name": "RMM",
                "address": "203.0.113.40",
                "created_at": "2026-01-01T00:00:00Z",
                "created_by": "seed",
            }
        )
        platform.bump(allowlist)
    page = open_portal("partner", account, view="endpoints")
    _look_up(page, "ep-strict-1")
    row = _endpoint_row(page, "ep-strict-1")
    expect(row.get_by_role("button", name="Release ep-strict-1")).to_have_count(0)
    _isolate(page, "ep-strict-1", "Isolate")
    expect(row.locator(".ep-mode")).to_have_text("standard")
    expect(row.locator(".ep-allowlist")).to_contain_text("203.0.113.40")
    expect(row.get_by_role("button", name="Release ep-strict-1")).to_be_visible()

    _isolate(page, "ep-strict-1", "Isolate strict")

    expect(row.locator(".ep-mode")).to_have_text("strict")
    expect(row.locator(".ep-allowlist")).to_have_text("None (platform only)")
    expect(row.locator(".ep-state")).to_have_text("Isolated")
    # A partner sees neither a release nor a way back to standard on a strict isolation (the
    # timeline stays readable).
    expect(row.locator('button:not([data-action="timeline"])')).to_have_count(0)
    _shot(page, screenshot_dir, "endpoints-strict-partner")

    soc = open_portal("soc", account, view="endpoints", sub="soc@platform.example")
    _look_up(soc, "ep-strict-1")
    soc_row = _endpoint_row(soc, "ep-strict-1")
    expect(soc_row.get_by_role("button", name="Release ep-strict-1")).to_be_visible()
    _isolate(soc, "ep-strict-1", "Release")
    expect(soc_row.locator(".ep-state")).to_have_text("Not isolated")
    assert platform.isolations["ep-strict-1"].mode is None


def test_rmm_compromised_strictly_isolates_everything_after_confirmation(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    for endpoint_id in ("ep-rmm-1", "ep-rmm-2", "ep-rmm-3"):
        platform.register(endpoint_id, account)
    page = open_portal("partner", account)
    page.get_by_role("switch", name="Tooling Connections").click()
    _add_entry(page, "RMM", "203.0.113.50")
    expect(page.locator("#entries-body tr")).to_have_count(1)
    page.get_by_role("link", name="Endpoints & Isolation").click()
    for endpoint_id in ("ep-rmm-1", "ep-rmm-2"):
        _look_up(page, endpoint_id)
        _isolate(page, endpoint_id, "Isolate")
        expect(_endpoint_row(page, endpoint_id).locator(".ep-mode")).to_have_text("standard")
    _look_up(page, "ep-rmm-3")

    # Cancelling the confirmation does nothing.
    page.get_by_role("button", name="RMM compromised…").click()
    page.locator("#confirm-cancel").click()
    assert platform.allowlist(account).enabled is True

    page.get_by_role("button", name="RMM compromised…").click()
    expect(page.get_by_role("dialog")).to_contain_text("strictly isolated")
    _shot(page, screenshot_dir, "endpoints-rmm-confirm")
    _confirm(page, reason="RMM credentials leaked")

    expect(page.locator("#banner")).to_contain_text("Strict isolation requested for 2 endpoints")
    for endpoint_id in ("ep-rmm-1", "ep-rmm-2"):
        row = _endpoint_row(page, endpoint_id)
        expect(row.locator(".ep-mode")).to_have_text("strict")
        expect(row.locator(".ep-allowlist")).to_have_text("None (platform only)")
    expect(_endpoint_row(page, "ep-rmm-3").locator(".ep-state")).to_have_text("Not isolated")
    assert platform.allowlist(account).enabled is False
    _shot(page, screenshot_dir, "endpoints-rmm-done")


def test_another_accounts_endpoint_is_not_listed(
    open_portal: OpenPortal, platform: FakePlatform, account: str
) -> None:
    platform.register("ep-mine", account)
    platform.register("ep-foreign", "acct-someone-else", hostname="host-ep-mine-too")
    page = open_portal("partner", account, view="endpoints")
    expect(_endpoint_row(page, "ep-mine")).to_be_visible()
    page.get_by_label("Search hostname").fill("ep-mine")
    expect(page.locator("#endpoints-body tr")).to_have_count(1)
    expect(_endpoint_row(page, "ep-foreign")).to_have_count(0)


def test_a_malformed_token_is_refused_before_any_call(
    browser: Any, stack: Any, screenshot_dir: Path
) -> None:
    settings, _ = stack
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{settings.url}/portal/")
        page.get_by_label("API token (JWT)").fill("not-a-jwt")
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("#token-error")).to_contain_text("not a JWT")
        expect(page.get_by_label("API token (JWT)")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#allowlist-view")).to_be_hidden()
        _shot(page, screenshot_dir, "token")
    finally:
        context.close()


def test_a_compromised_entry_is_revoked_from_every_isolated_endpoint_after_confirmation(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    for endpoint_id in ("ep-rv-1", "ep-rv-2"):
        platform.register(endpoint_id, account)
    page = open_portal("partner", account)
    page.get_by_role("switch", name="Tooling Connections").click()
    expect(page.locator("#switch-state")).to_have_text("On")
    _add_entry(page, "RMM A", "203.0.113.40")
    _add_entry(page, "RMM B", "203.0.113.41")
    expect(page.locator("#entries-body tr")).to_have_count(2)
    page.get_by_role("link", name="Endpoints & Isolation").click()
    for endpoint_id in ("ep-rv-1", "ep-rv-2"):
        _look_up(page, endpoint_id)
        _isolate(page, endpoint_id, "Isolate")
        expect(_endpoint_row(page, endpoint_id).locator(".ep-state")).to_have_text("Isolated")

    page.get_by_role("link", name="Tooling Allowlist").click()
    page.get_by_role("button", name="RMM A is compromised: revoke it everywhere").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text("cut at once")
    _confirm(page, reason="RMM A breached")

    progress = page.locator("#revoke-progress")
    expect(progress).to_contain_text("2 of 2 endpoints tightened · 2 of 2 applied")
    expect(progress).to_have_attribute("data-kind", "ok")
    expect(page.locator("#entries-body tr")).to_have_count(1)
    for endpoint_id in ("ep-rv-1", "ep-rv-2"):
        peers = platform.isolations[endpoint_id].policy["allowed_outbound"]  # type: ignore[index]
        assert [p["address"] for p in peers] == ["203.0.113.41"]
    _shot(page, screenshot_dir, "allowlist-revoked")
    page.get_by_role("link", name="Endpoints & Isolation").click()
    expect(_endpoint_row(page, "ep-rv-1").locator(".ep-allowlist")).to_have_text(
        "RMM B 203.0.113.41"
    )
    assert page.js_errors == []


def test_endpoint_view_shows_frozen_vs_current_and_refresh_takes_the_new_entry(
    open_portal: OpenPortal, platform: FakePlatform, account: str, screenshot_dir: Path
) -> None:
    platform.register("ep-fr-1", account)
    page = open_portal("partner", account)
    page.get_by_role("switch", name="Tooling Connections").click()
    expect(page.locator("#switch-state")).to_have_text("On")
    _add_entry(page, "RMM A", "203.0.113.50")
    expect(page.locator("#entries-body tr")).to_have_count(1)
    page.get_by_role("link", name="Endpoints & Isolation").click()
    _look_up(page, "ep-fr-1")
    _isolate(page, "ep-fr-1", "Isolate")
    row = _endpoint_row(page, "ep-fr-1")
    expect(row.locator(".ep-state")).to_have_text("Isolated")
    expect(row.locator(".freshness")).to_contain_text("frozen at settings v2; current is v2")

    page.get_by_role("link", name="Tooling Allowlist").click()
    _add_entry(page, "RMM C", "203.0.113.51")
    expect(page.locator("#entries-body tr")).to_have_count(2)
    page.get_by_role("link", name="Endpoints & Isolation").click()
    expect(row.locator(".freshness")).to_contain_text(
        "frozen at settings v2; current is v3: +1 / −0"
    )
    _shot(page, screenshot_dir, "endpoints-refresh-offered")
    row.get_by_role("button", name="Refresh the allowlist of ep-fr-1").click()
    _confirm(page, reason="new relay")
    expect(row.locator(".ep-allowlist")).to_contain_text("RMM C")
    expect(row.locator(".ep-state")).to_have_text("Isolated")
    expect(row.locator(".freshness")).to_contain_text("(up to date)")
    assert platform.isolations["ep-fr-1"].mode == "standard"
    assert page.js_errors == []
