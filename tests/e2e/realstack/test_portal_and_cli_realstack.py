"""The CLI and the portal against the real services and simulated agents (no fakes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from playwright.sync_api import expect
from typer.testing import CliRunner

from cli.app import app
from tests.e2e.realstack.conftest import RealStack, poll

runner = CliRunner()


def hostiso(stack: RealStack, role: str, *args: str) -> Any:
    """Run ``hostiso`` in-process against the real APIs with a token of ``role``."""
    env = {
        "HOSTISO_SETTINGS_URL": stack.settings_url,
        "HOSTISO_ISOLATION_URL": stack.isolation_url,
        "HOSTISO_TOKEN": stack.token(role),
        "COLUMNS": "200",
    }
    return runner.invoke(app, list(args), env=env)


def _json(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_lists_the_inventory_with_last_seen_and_resolves_a_hostname(
    realstack: RealStack,
) -> None:
    stack = realstack

    def listed() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = _json(hostiso(stack, "partner", "endpoints", "--json"))[
            "items"
        ]
        seen = [r for r in rows if r["endpoint_id"] in stack.endpoints and r["last_seen"]]
        return rows if len(seen) == len(stack.endpoints) else None

    # The agents enrolled through the enforcer and poll it: each shows up with a last_seen.
    rows = poll(listed, timeout=30, what="both agents listed with last_seen")
    by_id = {r["endpoint_id"]: r for r in rows}
    first = by_id[stack.endpoints[0]]
    assert first["platform"] == "linux" and first["hostname"]
    result = hostiso(stack, "partner", "status", "--host", first["hostname"], "--json")
    (row,) = _json(result)
    assert row["endpoint_id"] == stack.endpoints[0]
    table = hostiso(stack, "partner", "endpoints")
    assert table.exit_code == 0 and first["hostname"] in table.stdout


def test_cli_drives_allowlist_isolation_strict_and_release_end_to_end(
    realstack: RealStack,
) -> None:
    stack, endpoint = realstack, realstack.endpoints[0]
    account = ("--account", stack.account_id)

    result = hostiso(stack, "partner", "allowlist", "enable")
    assert result.exit_code == 0, result.output
    assert "Tooling Connections on" in result.stdout

    result = hostiso(stack, "partner", "allowlist", "add", "ConnectWise Automate", "203.0.113.10")
    assert result.exit_code == 0, result.output
    assert "Added 'ConnectWise Automate' 203.0.113.10" in result.stdout

    result = hostiso(stack, "partner", "allowlist", "add", "Cloud RMM", "rmm.vendor.example")
    assert result.exit_code == 1
    assert "cloud RMMs with dynamic addresses are not supported" in result.stderr

    shown = _json(hostiso(stack, "partner", "allowlist", "show", "--json"))
    assert shown["enabled"] is True
    assert [e["address"] for e in shown["entries"]] == ["203.0.113.10"]

    result = hostiso(
        stack,
        "partner",
        "isolate",
        endpoint,
        "--watch",
        "--wait-timeout",
        "30",
        "--interval",
        "0.2",
    )
    assert result.exit_code == 0, result.output
    assert f"standard isolation of {endpoint} accepted" in result.stdout

    rows = _json(hostiso(stack, "partner", "status", "--json"))
    (row,) = [r for r in rows if r["endpoint_id"] == endpoint]
    assert (row["state"], row["mode"]) == ("isolated", "standard")
    assert [p["address"] for p in row["policy"]["allowed_outbound"]] == ["203.0.113.10"]
    _assert_one_trace_from_request_to_agent_ack(stack, endpoint)

    table = hostiso(stack, "partner", "status")
    assert table.exit_code == 0 and endpoint[:8] in table.stdout

    result = hostiso(
        stack,
        "soc",
        "account",
        "strict",
        *account,
        "--yes",
        "--watch",
        "--wait-timeout",
        "30",
        "--interval",
        "0.2",
    )
    assert result.exit_code == 0, result.output
    assert "strict isolation of 1 endpoint(s)" in result.stdout
    assert "Tooling Connections off" in result.stdout
    isolation = stack.isolation(endpoint)
    assert (isolation["state"], isolation["mode"]) == ("isolated", "strict")
    assert isolation["policy"]["allowed_outbound"] == []
    assert _json(hostiso(stack, "partner", "allowlist", "show", "--json"))["enabled"] is False

    # Only the SOC releases a strict isolation: the partner is refused with exit code 1.
    result = hostiso(stack, "partner", "release", endpoint)
    assert result.exit_code == 1
    assert "strict" in result.stderr.lower()
    assert stack.isolation(endpoint)["mode"] == "strict"

    result = hostiso(
        stack, "soc", "release", endpoint, "--watch", "--wait-timeout", "30", "--interval", "0.2"
    )
    assert result.exit_code == 0, result.output
    assert stack.isolation(endpoint)["state"] == "not_isolated"


def _assert_one_trace_from_request_to_agent_ack(stack: RealStack, endpoint: str) -> None:
    """The isolation's REST request, request lane, command and the agent's ack share one trace."""

    def ack_span() -> dict[str, Any] | None:
        return next(
            (
                span
                for span in stack.spans("isolation")
                if span["name"].endswith("isolation.status.v1 acknowledged")
                and span["attributes"].get("hostiso.endpoint_id") == endpoint
            ),
            None,
        )

    ack = poll(ack_span, timeout=10, what="the agent's ack span")
    trace_id = ack["context"]["trace_id"]
    names = {s["name"] for s in stack.spans("isolation") if s["context"]["trace_id"] == trace_id}
    prefix = stack.topic_prefix
    assert {
        "POST /v1/endpoints/{endpoint_id}/isolation",
        f"{prefix}isolation.requests.v1 publish",
        f"{prefix}isolation.requests.v1 process",
        f"{prefix}enforcer.commands.v1 publish",
    } <= names, names
    # The ack itself came over the agent's HTTP request to the enforcer: linked, not lost.
    assert ack["links"], ack


def _shot(page: Any, directory: Path, name: str) -> None:
    page.screenshot(path=str(directory / f"realstack-{name}.png"), full_page=True)


def _add_entry(page: Any, name: str, address: str) -> None:
    page.get_by_label("Display name").fill(name)
    page.get_by_label("IPv4 address").fill(address)
    page.get_by_role("button", name="Add entry").click()


def _isolate(page: Any, endpoint_id: str, action: str) -> None:
    row = page.locator(f'tr[data-endpoint-id="{endpoint_id}"]')
    row.get_by_role("button", name=f"{action} {endpoint_id}").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Reason").fill(f"{action} from the real-stack browser test")
    dialog.locator("#confirm-ok").click()
    expect(dialog).to_be_hidden()


def test_portal_on_the_real_stack_freezes_the_allowlist_and_strict_wins(
    realstack: RealStack, browser: Any, screenshot_dir: Path
) -> None:
    stack, endpoint = realstack, realstack.endpoints[1]
    with stack.api() as client:
        # A known starting point whatever ran before: the switch off.
        url = f"{stack.settings_url}/v1/accounts/{stack.account_id}/tooling-allowlist"
        assert client.patch(url, json={"enabled": False}).status_code == 200

    context = browser.new_context(viewport={"width": 1360, "height": 860})
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{stack.settings_url}/portal/#/allowlist")
        page.get_by_label("API token (JWT)").fill(stack.token("partner"))
        page.get_by_role("button", name="Use token").click()

        switch = page.get_by_role("switch", name="Tooling Connections")
        expect(switch).to_have_attribute("aria-checked", "false")
        switch.click()
        expect(page.locator("#switch-state")).to_have_text("On")

        _add_entry(page, "Kaseya VSA", "198.51.100.20")
        expect(page.locator("#entries-body tr").filter(has_text="198.51.100.20")).to_contain_text(
            "Kaseya VSA"
        )
        _add_entry(page, "Cloud RMM", "rmm.vendor.example")
        expect(page.locator("#entry-address-error")).to_contain_text(
            "cloud RMMs with dynamic addresses are not supported"
        )
        _shot(page, screenshot_dir, "allowlist")

        page.get_by_role("link", name="Endpoints & Isolation").click()
        # Every enrolled endpoint is listed (the inventory), with its hostname.
        row = page.locator(f'tr[data-endpoint-id="{endpoint}"]')
        expect(row.locator(".ep-hostname")).not_to_be_empty()
        expect(row).to_be_visible()
        _isolate(page, endpoint, "Isolate")
        # "Isolated" only once the simulated agent reported the policy applied.
        expect(row.locator(".ep-state")).to_have_text("Isolated")
        expect(row.locator(".ep-allowlist")).to_contain_text("198.51.100.20")
        frozen_version = row.locator(".ep-settings-version").inner_text()
        frozen = stack.isolation(endpoint)["policy"]["allowed_outbound"]
        assert "198.51.100.20" in {peer["address"] for peer in frozen}

        # A settings change after isolation leaves the frozen allowlist as it was.
        page.get_by_role("link", name="Tooling Allowlist").click()
        _add_entry(page, "NinjaOne relay", "198.51.100.21")
        expect(page.locator("#entries-body tr")).to_have_count(2)
        page.get_by_role("link", name="Endpoints & Isolation").click()
        expect(row.locator(".ep-allowlist")).not_to_contain_text("198.51.100.21")
        expect(row.locator(".ep-settings-version")).to_have_text(frozen_version)
        assert stack.isolation(endpoint)["policy"]["allowed_outbound"] == frozen

        _isolate(page, endpoint, "Isolate strict")
        expect(row.locator(".ep-mode")).to_have_text("strict")
        expect(row.locator(".ep-state")).to_have_text("Isolated")
        expect(row.locator(".ep-allowlist")).to_have_text("None (platform only)")
        _shot(page, screenshot_dir, "endpoints-strict")

        # A later standard request never downgrades strict: the SOC's is accepted and changes
        # nothing. Requests of one endpoint are applied in order, so once the release that
        # follows it is applied, the standard request was too; the release taking the very next
        # sequence proves that no policy was issued in between.
        strict_sequence = stack.isolation(endpoint)["desired_sequence"]
        with stack.api("soc") as client:
            url = f"{stack.isolation_url}/v1/endpoints/{endpoint}/isolation"
            late = client.post(url, json={"mode": "standard", "reason": "late standard"})
            assert late.status_code == 202, late.text
            assert client.delete(url).status_code == 202
        released = poll(
            lambda: (view := stack.isolation(endpoint))["state"] == "not_isolated" and view,
            timeout=20,
            what="the release applied",
        )
        assert released["desired_sequence"] == strict_sequence + 1
        assert errors == []
    finally:
        context.close()
