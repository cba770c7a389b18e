"""``hostiso endpoints``, ``--host`` resolution, ``timeline``, ``--version``, ``--json`` and completion."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.unit.cli.test_cli import FakeApis, run

pytestmark = pytest.mark.unit

# Between table cells: spaces and the box-drawing column rules.
S = r"[\s│┃]+"


def _row(
    endpoint_id: str, hostname: str, state: str = "not_isolated", **extra: Any
) -> dict[str, Any]:
    return {
        "endpoint_id": endpoint_id,
        "hostname": hostname,
        "platform": "linux",
        "enrolled_at": "2026-11-29T13:00:00Z",
        "last_seen": None,
        "state": state,
        "mode": None,
        "applied_sequence": 0,
        **extra,
    }


@dataclass
class InventoryApis(FakeApis):
    """The inventory and timeline routes on top of the CLI's fake APIs (pages of ``page`` rows)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    page: int = 2
    timeline_items: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if re.fullmatch(r"/v1/accounts/[^/]+/endpoints", path):
            self.requests.append(request)
            params = request.url.params
            q = (params.get("q") or "").lower()
            state = params.get("state")
            rows = [
                r
                for r in self.rows
                if q in r["hostname"].lower() and (state is None or r["state"] == state)
            ]
            start = int(params.get("cursor") or 0)
            items = rows[start : start + self.page]
            more = start + self.page < len(rows)
            return httpx.Response(
                200, json={"items": items, "next_cursor": str(start + self.page) if more else None}
            )
        if m := re.fullmatch(r"/v1/endpoints/([^/]+)/isolation/timeline", path):
            self.requests.append(request)
            return httpx.Response(
                200, json={"endpoint_id": m.group(1), "items": self.timeline_items}
            )
        return super().__call__(request)


@pytest.fixture
def inv() -> InventoryApis:
    return InventoryApis(
        rows=[
            _row("ep-1", "db-01", last_seen="2026-11-29T14:05:00Z"),
            _row("ep-2", "web-01", "isolated", mode="strict", applied_sequence=3),
            _row("ep-3", "web-02"),
            _row("ep-4", "WEB-02"),
        ]
    )


def test_endpoints_lists_every_page_with_hostname_platform_state_mode_and_last_seen(
    inv: InventoryApis,
) -> None:
    result = run(inv, "endpoints", "-a", "acct-a")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.search(
        S.join([r"Hostname", r"Platform", r"State", r"Mode", r"Last seen", r"Endpoint"]), lines[0]
    )
    assert re.search(
        S.join([r"db-01", r"linux", r"not_isolated", r"—", r"2026-11-29 14:05:00", r"ep-1"]),
        result.stdout,
    )
    assert re.search(
        S.join([r"web-01", r"linux", r"isolated", r"strict", r"never", r"ep-2"]), result.stdout
    )
    assert "4 endpoint(s) of acct-a" in result.stdout
    # Two pages of two: the second request carried the first page's cursor.
    pages = [r for r in inv.requests if r.url.path.endswith("/endpoints")]
    assert [r.url.params.get("cursor") for r in pages] == [None, "2"]


def test_endpoints_passes_state_and_host_filters_and_json_is_the_apis_items(
    inv: InventoryApis,
) -> None:
    result = run(inv, "endpoints", "-a", "acct-a", "--state", "isolated", "--host", "WEB", "--json")
    assert result.exit_code == 0, result.output
    sent = inv.requests[0].url.params
    assert (sent["state"], sent["q"]) == ("isolated", "WEB")
    assert json.loads(result.stdout) == {"items": [inv.rows[1]], "next_cursor": None}


def test_isolate_by_host_resolves_the_one_exact_hostname(inv: InventoryApis) -> None:
    result = run(inv, "isolate", "--host", "DB-01", "-a", "acct-a", "--strict")
    assert result.exit_code == 0, result.output
    posted = [r for r in inv.requests if r.method == "POST"]
    assert [r.url.path for r in posted] == ["/v1/endpoints/ep-1/isolation"]
    assert json.loads(posted[0].content)["mode"] == "strict"


def test_an_ambiguous_host_is_refused_with_the_candidates_and_nothing_is_sent(
    inv: InventoryApis,
) -> None:
    result = run(inv, "release", "--host", "web-02", "-a", "acct-a")
    assert result.exit_code == 1
    assert "ambiguous" in result.stderr
    assert "web-02 (ep-3, not_isolated)" in result.stderr
    assert "WEB-02 (ep-4, not_isolated)" in result.stderr
    assert not [r for r in inv.requests if r.method in ("POST", "DELETE")]


def test_an_unknown_host_is_refused_listing_near_names(inv: InventoryApis) -> None:
    result = run(inv, "isolate", "--host", "web", "-a", "acct-a")
    assert result.exit_code == 1
    assert "no endpoint of acct-a has exactly that hostname" in result.stderr
    assert "web-01 (ep-2, isolated)" in result.stderr
    none = run(inv, "isolate", "--host", "mail-01", "-a", "acct-a")
    assert none.exit_code == 1
    assert "no endpoint of acct-a has that hostname" in none.stderr
    assert not [r for r in inv.requests if r.method == "POST"]


def test_status_by_host_shows_that_endpoint(inv: InventoryApis) -> None:
    result = run(inv, "status", "--host", "web-01", "-a", "acct-a", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["endpoint_id"] == "ep-2"


def test_isolate_without_endpoint_or_host_is_a_usage_error(inv: InventoryApis) -> None:
    result = run(inv, "isolate")
    assert result.exit_code == 2
    assert "--host" in result.stderr


def test_isolate_json_prints_the_accepted_requests(inv: InventoryApis) -> None:
    result = run(inv, "isolate", "ep-9", "--json")
    assert result.exit_code == 0, result.output
    (accepted,) = json.loads(result.stdout)
    assert accepted["endpoint_id"] == "ep-9" and accepted["request_id"].startswith("req-")


def test_timeline_prints_who_why_and_the_agents_answer(inv: InventoryApis) -> None:
    inv.timeline_items = [
        {
            "sequence": 2,
            "policy_id": "p-2",
            "mode": "none",
            "issued_at": "2026-11-29T15:00:00Z",
            "issued_by": "soc@platform.example",
            "reason": "all clear",
            "settings_version": 4,
            "request_ids": ["r-2"],
            "status": "pending",
            "reported_at": None,
            "detail": "",
            "rules_sha256": None,
        },
        {
            "sequence": 1,
            "policy_id": "p-1",
            "mode": "standard",
            "issued_at": "2026-11-29T14:00:00Z",
            "issued_by": "alice@msp.example",
            "reason": "incident 42",
            "settings_version": 4,
            "request_ids": ["r-1"],
            "status": "failed",
            "reported_at": "2026-11-29T14:00:05Z",
            "detail": "nft: table busy",
            "rules_sha256": None,
        },
    ]
    result = run(inv, "timeline", "--host", "web-01", "-a", "acct-a")
    assert result.exit_code == 0, result.output
    assert re.search(
        S.join([r"2", r"2026-11-29 15:00:00", r"soc@platform.example", r"release"]), result.stdout
    )
    assert re.search(S.join([r"incident 42", r"failed", r"nft: table busy"]), result.stdout)
    assert inv.requests[-1].url.path == "/v1/endpoints/ep-2/isolation/timeline"
    as_json = run(inv, "timeline", "ep-2", "--json", "--limit", "5")
    assert json.loads(as_json.stdout)["items"] == inv.timeline_items
    assert inv.requests[-1].url.params["limit"] == "5"


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = run(None, "--version", token=None)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"hostiso {version('hostiso')}"


def test_shell_completion_script_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    # Name the shell instead of detecting the parent process's (none under a test runner).
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = run(None, "--show-completion", "bash", token=None)
    assert result.exit_code == 0, result.output
    assert "complete" in result.stdout and "hostiso" in result.stdout.lower()
    helped = run(None, "--help", token=None)
    assert "--install-completion" in helped.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["allowlist", "enable", "-a", "acct-a"],
        ["allowlist", "disable", "-a", "acct-a"],
        ["allowlist", "add", "RMM", "198.51.100.7", "-a", "acct-a"],
        ["allowlist", "rename", "e-1", "RMM 2", "-a", "acct-a"],
        ["allowlist", "remove", "e-1", "-a", "acct-a"],
        ["account", "strict", "-a", "acct-a", "--yes"],
        ["release", "ep-1"],
        ["watch", "-a", "acct-a"],
        ["endpoints", "-a", "acct-a"],
    ],
)
def test_every_api_command_answers_json_with_json(inv: InventoryApis, args: list[str]) -> None:
    result = run(inv, *args, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)


def test_token_json_carries_the_token_and_its_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTISO_JWT_SECRET", raising=False)
    result = run(
        None,
        "token",
        "--role",
        "partner",
        "--account-id",
        "acct-a",
        "--json",
        token=None,
        env={"HOSTISO_DEV": "1"},
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["role"], body["account_id"]) == ("partner", "acct-a")
    assert body["token"].count(".") == 2
