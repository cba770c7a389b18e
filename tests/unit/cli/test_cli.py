"""The hostiso CLI against an in-memory fake of the REST APIs (httpx.MockTransport): requests, output, exit codes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from typer.testing import CliRunner, Result

import cli.app as cli_app
from cli.app import CliOptions, app
from shared.auth import mint_token
from shared.config import DEV_JWT_SECRET

SECRET = "cli-test-secret-0123456789abcdef0123"
SOC = mint_token(SECRET, sub="soc@platform.example", role="soc")
PARTNER = mint_token(SECRET, sub="alice@msp.example", role="partner", account_id="acct-a")
SETTINGS = "http://settings.test"
ISOLATION = "http://isolation.test"


def _isolation(
    endpoint_id: str, state: str, mode: str | None, seq: int, applied: int
) -> dict[str, Any]:
    peers = [{"name": "RMM", "address": "203.0.113.10"}] if mode == "standard" else []
    return {
        "endpoint_id": endpoint_id,
        "account_id": "acct-a",
        "state": state,
        "mode": mode,
        "policy": None
        if mode is None
        else {"mode": mode, "allowed_outbound": peers, "settings_version": 4, "sequence": seq},
        "desired_sequence": seq,
        "applied_sequence": applied,
        "updated_at": "2026-11-29T14:00:00+00:00",
    }


@dataclass
class FakeApis:
    """Answers the DESIGN §4 routes from canned state; records every request."""

    requests: list[httpx.Request] = field(default_factory=list)
    allowlist: dict[str, Any] = field(
        default_factory=lambda: {
            "account_id": "acct-a",
            "enabled": True,
            "entries": [
                {
                    "id": "e-1",
                    "name": "ConnectWise Automate",
                    "address": "203.0.113.10",
                    "created_at": "2026-11-29T13:00:00Z",
                    "created_by": "alice@msp.example",
                }
            ],
            "version": 4,
            "updated_at": "2026-11-29T13:00:00Z",
        }
    )
    # Successive answers per endpoint GET; the last one repeats.
    timelines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    overrides: dict[tuple[str, str], httpx.Response] = field(default_factory=dict)

    def isolation(self, endpoint_id: str) -> dict[str, Any]:
        timeline = self.timelines.get(endpoint_id)
        if not timeline:
            return _isolation(endpoint_id, "not_isolated", None, 0, 0)
        return timeline.pop(0) if len(timeline) > 1 else timeline[0]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = (request.method, request.url.path)
        if key in self.overrides:
            return self.overrides[key]
        path = request.url.path
        if request.url.host == "settings.test":
            if re.fullmatch(r"/v1/accounts/[^/]+/tooling-allowlist", path):
                if request.method == "PATCH":
                    self.allowlist = {
                        **self.allowlist,
                        **json.loads(request.content),
                        "version": self.allowlist["version"] + 1,
                    }
                return httpx.Response(
                    200, json=self.allowlist, headers={"ETag": f'"{self.allowlist["version"]}"'}
                )
            if path.endswith("/entries") and request.method == "POST":
                body = json.loads(request.content)
                return httpx.Response(201, json={"id": "e-2", **body})
            if "/entries/" in path:
                return httpx.Response(204 if request.method == "DELETE" else 200, json=None)
        if request.url.host == "isolation.test":
            if m := re.fullmatch(r"/v1/endpoints/([^/]+)/isolation", path):
                if request.method == "GET":
                    return httpx.Response(200, json=self.isolation(m.group(1)))
                return httpx.Response(202, json={"request_id": f"req-{len(self.requests)}"})
            if re.fullmatch(r"/v1/accounts/[^/]+/strict-isolation", path):
                return httpx.Response(202, json={"request_id": "req-acct", "endpoints": 2})
            if re.fullmatch(r"/v1/accounts/[^/]+/isolations", path):
                rows = [self.isolation(eid) for eid in self.timelines]
                listed = [r for r in rows if r["state"] != "not_isolated"]
                return httpx.Response(200, json={"account_id": "acct-a", "endpoints": listed})
        return httpx.Response(404, json={"detail": f"no route {request.method} {path}"})


@pytest.fixture
def fake() -> FakeApis:
    return FakeApis()


def run(
    fake: FakeApis | None,
    *args: str,
    token: str | None = SOC,
    input: str | None = None,
    env: dict[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Result:
    base = ["--settings-url", SETTINGS, "--isolation-url", ISOLATION]
    if token:
        base += ["--token", token]
    options = CliOptions(transport=transport or (httpx.MockTransport(fake) if fake else None))
    return CliRunner().invoke(
        app,
        [*base, *args],
        obj=options,
        input=input,
        env={"COLUMNS": "200", "HOSTISO_TOKEN": "", "HOSTISO_ACCOUNT": "", **(env or {})},
    )


def test_allowlist_show_prints_switch_and_entries_with_the_bearer_token(fake: FakeApis) -> None:
    result = run(fake, "allowlist", "show", "--account", "acct-a")
    assert result.exit_code == 0, result.output
    assert "Tooling Connections: On" in result.stdout
    assert "version 4" in result.stdout
    assert "ConnectWise Automate" in result.stdout and "203.0.113.10" in result.stdout
    assert "alice@msp.example" in result.stdout
    sent = fake.requests[0]
    assert sent.url == f"{SETTINGS}/v1/accounts/acct-a/tooling-allowlist"
    assert sent.headers["Authorization"] == f"Bearer {SOC}"


def test_allowlist_show_json_is_the_apis_body(fake: FakeApis) -> None:
    result = run(fake, "allowlist", "show", "-a", "acct-a", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == fake.allowlist


def test_a_partner_token_defaults_the_account(fake: FakeApis) -> None:
    result = run(fake, "allowlist", "show", token=PARTNER)
    assert result.exit_code == 0, result.output
    assert fake.requests[0].url.path == "/v1/accounts/acct-a/tooling-allowlist"


def test_a_soc_without_account_gets_a_usage_error(fake: FakeApis) -> None:
    result = run(fake, "allowlist", "show")
    assert result.exit_code == 2
    assert "--account" in result.stderr
    assert fake.requests == []


def test_no_token_is_a_usage_error_naming_the_variable(fake: FakeApis) -> None:
    result = run(fake, "status", "-a", "acct-a", token=None)
    assert result.exit_code == 2
    assert "HOSTISO_TOKEN" in result.stderr


def test_enable_sends_if_match_and_reports_the_new_version(fake: FakeApis) -> None:
    fake.allowlist["enabled"] = False
    result = run(fake, "allowlist", "enable", "-a", "acct-a", "--if-match", '"4"')
    assert result.exit_code == 0, result.output
    patch = fake.requests[0]
    assert patch.method == "PATCH" and json.loads(patch.content) == {"enabled": True}
    assert patch.headers["If-Match"] == '"4"'
    assert "Tooling Connections on for acct-a (version 5)" in result.stdout


def test_a_stale_version_exits_1_with_the_apis_detail(fake: FakeApis) -> None:
    fake.overrides[("PATCH", "/v1/accounts/acct-a/tooling-allowlist")] = httpx.Response(
        412, json={"detail": "If-Match: stale version 3, current is 4"}
    )
    result = run(fake, "allowlist", "disable", "-a", "acct-a", "--if-match", "3")
    assert result.exit_code == 1
    assert "refused (412): If-Match: stale version 3, current is 4" in result.stderr


def test_add_posts_the_entry(fake: FakeApis) -> None:
    result = run(fake, "allowlist", "add", "Kaseya VSA", "198.51.100.7", "-a", "acct-a")
    assert result.exit_code == 0, result.output
    assert json.loads(fake.requests[0].content) == {"name": "Kaseya VSA", "address": "198.51.100.7"}
    assert "Added 'Kaseya VSA' 198.51.100.7 (entry e-2)" in result.stdout


def test_add_posts_the_v2_fields_only_when_given(fake: FakeApis) -> None:
    result = run(
        fake, "allowlist", "add", "Tool", "2001:db8::10", "-a", "acct-a",
        "--port", "8041", "--port", "443", "--protocol", "tcp",
        "--expires", "2026-12-31T18:00:00Z",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(fake.requests[0].content) == {
        "name": "Tool",
        "address": "2001:db8::10",
        "ports": [8041, 443],
        "protocol": "tcp",
        "expires_at": "2026-12-31T18:00:00Z",
    }


def test_a_hostname_is_refused_with_the_field_and_the_rule(fake: FakeApis) -> None:
    msg = "cloud RMMs with dynamic addresses are not supported; use the static IPv4 address of a self-hosted server"
    fake.overrides[("POST", "/v1/accounts/acct-a/tooling-allowlist/entries")] = httpx.Response(
        422, json={"detail": [{"loc": ["body", "address"], "msg": msg, "type": "value_error"}]}
    )
    result = run(fake, "allowlist", "add", "Cloud", "rmm.vendor.example", "-a", "acct-a")
    assert result.exit_code == 1
    assert f"refused (422): address: {msg}" in " ".join(result.stderr.split())


def test_rename_and_remove_target_the_entry(fake: FakeApis) -> None:
    assert run(fake, "allowlist", "rename", "e-1", "Datacenter RMM", "-a", "acct-a").exit_code == 0
    assert run(fake, "allowlist", "remove", "e-1", "-a", "acct-a").exit_code == 0
    rename, remove = fake.requests
    assert (rename.method, rename.url.path) == (
        "PATCH",
        "/v1/accounts/acct-a/tooling-allowlist/entries/e-1",
    )
    assert json.loads(rename.content) == {"name": "Datacenter RMM"}
    assert (remove.method, remove.url.path) == (
        "DELETE",
        "/v1/accounts/acct-a/tooling-allowlist/entries/e-1",
    )


def test_isolate_strict_posts_mode_and_reason_for_each_endpoint(fake: FakeApis) -> None:
    result = run(fake, "isolate", "ep-1", "ep-2", "--strict", "--reason", "RMM suspected")
    assert result.exit_code == 0, result.output
    assert [r.url.path for r in fake.requests] == [
        "/v1/endpoints/ep-1/isolation",
        "/v1/endpoints/ep-2/isolation",
    ]
    assert json.loads(fake.requests[0].content) == {"mode": "strict", "reason": "RMM suspected"}
    assert "strict isolation of ep-1 accepted" in result.stdout


def test_isolate_defaults_to_standard(fake: FakeApis) -> None:
    assert run(fake, "isolate", "ep-1").exit_code == 0
    assert json.loads(fake.requests[0].content)["mode"] == "standard"


def test_a_partner_releasing_strict_exits_1_with_the_reason(fake: FakeApis) -> None:
    fake.overrides[("DELETE", "/v1/endpoints/ep-1/isolation")] = httpx.Response(
        403, json={"detail": "only the SOC may release a strict isolation"}
    )
    result = run(fake, "release", "ep-1", token=PARTNER)
    assert result.exit_code == 1
    assert "refused (403): only the SOC may release a strict isolation" in result.stderr


def test_account_strict_asks_first_and_does_nothing_when_declined(fake: FakeApis) -> None:
    result = run(fake, "account", "strict", "-a", "acct-a", input="n\n")
    assert result.exit_code == 2
    assert fake.requests == []


def test_account_strict_switches_the_allowlist_off_unless_kept(fake: FakeApis) -> None:
    result = run(fake, "account", "strict", "-a", "acct-a", "--yes", "--reason", "leaked")
    assert result.exit_code == 0, result.output
    post = next(r for r in fake.requests if r.method == "POST")
    assert post.url.path == "/v1/accounts/acct-a/strict-isolation"
    assert json.loads(post.content) == {"reason": "leaked", "disable_allowlist": True}
    assert "strict isolation of 2 endpoint(s) of acct-a accepted" in result.stdout

    kept = FakeApis()
    assert run(kept, "account", "strict", "-a", "acct-a", "-y", "--keep-allowlist").exit_code == 0
    post = next(r for r in kept.requests if r.method == "POST")
    assert json.loads(post.content)["disable_allowlist"] is False


def test_status_prints_state_mode_and_the_frozen_allowlist(fake: FakeApis) -> None:
    fake.timelines = {
        "ep-1": [_isolation("ep-1", "isolated", "standard", 3, 3)],
        "ep-2": [_isolation("ep-2", "isolation_pending", "strict", 2, 1)],
    }
    result = run(fake, "status", "-a", "acct-a")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    ep1 = next(line for line in lines if "ep-1" in line)
    ep2 = next(line for line in lines if "ep-2" in line)
    assert "isolated" in ep1 and "standard" in ep1 and "RMM 203.0.113.10" in ep1 and "3/3" in ep1
    assert (
        "isolation_pending" in ep2 and "strict" in ep2 and "platform only" in ep2 and "2/1" in ep2
    )


def test_watch_polls_until_every_endpoint_applied(fake: FakeApis) -> None:
    fake.timelines = {
        "ep-1": [
            _isolation("ep-1", "isolation_pending", "strict", 2, 1),
            _isolation("ep-1", "isolation_pending", "strict", 2, 1),
            _isolation("ep-1", "isolated", "strict", 2, 2),
        ],
        "ep-2": [
            _isolation("ep-2", "release_pending", None, 5, 4),
            _isolation("ep-2", "not_isolated", None, 5, 5),
        ],
    }
    result = run(fake, "watch", "-e", "ep-1", "-e", "ep-2", "--interval", "0")
    assert result.exit_code == 0, result.output
    assert "all 2 endpoint(s) applied" in result.stdout
    assert len([r for r in fake.requests if r.url.path == "/v1/endpoints/ep-1/isolation"]) == 3


def test_watch_exits_4_when_the_deadline_passes(fake: FakeApis) -> None:
    fake.timelines = {"ep-1": [_isolation("ep-1", "isolation_pending", "standard", 2, 1)]}
    result = run(fake, "watch", "-e", "ep-1", "--wait-timeout", "0", "--interval", "0")
    assert result.exit_code == 4
    assert "still waiting for ep-1" in result.stderr


def test_watch_exits_1_when_an_agent_failed(fake: FakeApis) -> None:
    fake.timelines = {"ep-1": [_isolation("ep-1", "failed", "standard", 2, 1)]}
    result = run(fake, "watch", "-a", "acct-a", "--interval", "0")
    assert result.exit_code == 1
    assert "1 endpoint(s) failed to apply: ep-1" in result.stderr


def test_isolate_watch_ignores_the_previous_settled_policy(fake: FakeApis) -> None:
    # Before the request the endpoint is settled at sequence 1 (standard); the strict request
    # travels through Kafka, so the first polls still show the old policy.
    fake.timelines = {
        "ep-1": [
            _isolation("ep-1", "isolated", "standard", 1, 1),
            _isolation("ep-1", "isolated", "standard", 1, 1),
            _isolation("ep-1", "isolation_pending", "strict", 2, 1),
            _isolation("ep-1", "isolated", "strict", 2, 2),
        ]
    }
    result = run(fake, "isolate", "ep-1", "--strict", "--watch", "--interval", "0")
    assert result.exit_code == 0, result.output
    gets = [r for r in fake.requests if r.method == "GET"]
    assert len(gets) == 4, "kept polling past the old, settled standard policy"


def test_unreachable_api_exits_3(fake: FakeApis) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    result = run(None, "status", "-a", "acct-a", transport=httpx.MockTransport(refuse))
    assert result.exit_code == 3
    assert "unreachable" in result.stderr and ISOLATION in result.stderr


def test_a_server_error_exits_3_with_its_detail(fake: FakeApis) -> None:
    fake.overrides[("GET", "/v1/accounts/acct-a/tooling-allowlist")] = httpx.Response(
        503, json={"detail": "saved; will be published when Kafka is reachable"}
    )
    result = run(fake, "allowlist", "show", "-a", "acct-a")
    assert result.exit_code == 3
    assert "503 saved; will be published when Kafka is reachable" in result.stderr


def test_an_unknown_option_is_a_usage_error(fake: FakeApis) -> None:
    assert run(fake, "isolate", "ep-1", "--loose").exit_code == 2


def test_token_mints_with_the_dev_secret_only_in_dev_mode() -> None:
    env = {"HOSTISO_DEV": "1", "HOSTISO_JWT_SECRET": ""}
    result = run(None, "token", "--role", "partner", "--account-id", "acct-a", token=None, env=env)
    assert result.exit_code == 0, result.output
    claims = jwt.decode(
        result.stdout.strip(), DEV_JWT_SECRET, algorithms=["HS256"], audience="hostiso-settings"
    )
    assert (claims["role"], claims["account_id"]) == ("partner", "acct-a")
    assert claims["aud"] == ["hostiso-settings", "hostiso-isolation", "hostiso-enforcer"]

    refused = run(None, "token", token=None, env={"HOSTISO_DEV": "0"})
    assert refused.exit_code == 2
    assert "HOSTISO_DEV=1" in refused.stderr

    partner_without_account = run(None, "token", "--role", "partner", token=None, env=env)
    assert partner_without_account.exit_code == 2


class _FinishedProcess:
    pid = 4242
    returncode = 0

    def wait(self) -> int:
        return 0

    def poll(self) -> int:
        return 0


def test_infra_up_delegates_to_shared_infra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[list[str], bool]] = []

    def spawn(args: list[str], *, detach: bool, log_path: Path) -> Any:
        calls.append((args, detach))
        return _FinishedProcess()

    monkeypatch.setattr(cli_app, "spawn_infra", spawn)
    result = run(
        None, "infra", "up", "--nodes", "3", token=None, env={"HOSTISO_RUN_DIR": str(tmp_path)}
    )
    assert result.exit_code == 0, result.output
    assert calls == [(["up", "--nodes", "3", "--topic-prefix", "hostiso."], False)]


def test_infra_down_without_a_detached_run_is_a_no_op(tmp_path: Path) -> None:
    result = run(None, "infra", "down", token=None, env={"HOSTISO_RUN_DIR": str(tmp_path)})
    assert result.exit_code == 0
    assert "nothing to stop" in result.stdout


def test_infra_down_json_says_nothing_was_stopped(tmp_path: Path) -> None:
    result = run(
        None, "infra", "down", "--json", token=None, env={"HOSTISO_RUN_DIR": str(tmp_path)}
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"stopped": False, "pid": None}


def test_infra_up_json_in_the_foreground_is_a_usage_error(tmp_path: Path) -> None:
    result = run(None, "infra", "up", "--json", token=None, env={"HOSTISO_RUN_DIR": str(tmp_path)})
    assert result.exit_code == 2
    assert "--detach" in result.output


def test_client_reads_both_list_shapes() -> None:
    from cli.client import isolation_rows

    row = _isolation("ep-1", "isolated", "strict", 1, 1)
    assert isolation_rows([row]) == [row]
    assert isolation_rows({"account_id": "acct-a", "endpoints": [row]}) == [row]
    assert isolation_rows({"unexpected": 1}) == []


def test_token_refuses_a_lifetime_the_services_would_refuse() -> None:
    env = {"HOSTISO_DEV": "1", "HOSTISO_JWT_SECRET": ""}
    century = run(None, "token", "--ttl", str(100 * 365 * 86400), token=None, env=env)
    assert century.exit_code == 2
    assert "--ttl: must be between 1 and 86400 seconds for role soc" in century.stderr
    service = run(
        None, "token", "--role", "service", "--ttl", "7200", "--scope", "x", token=None, env=env
    )
    assert service.exit_code == 2 and "3600 seconds for role service" in service.stderr


def test_a_service_token_names_its_scope_and_audience() -> None:
    env = {"HOSTISO_DEV": "1", "HOSTISO_JWT_SECRET": ""}
    unscoped = run(None, "token", "--role", "service", token=None, env=env)
    assert unscoped.exit_code == 2 and "--scope" in unscoped.stderr
    result = run(
        None,
        "token",
        "--role",
        "service",
        "--scope",
        "allowlist:write",
        "--audience",
        "hostiso-settings",
        token=None,
        env=env,
    )
    assert result.exit_code == 0, result.output
    claims = jwt.decode(
        result.stdout.strip(), DEV_JWT_SECRET, algorithms=["HS256"], audience="hostiso-settings"
    )
    assert (claims["scope"], claims["aud"]) == ("allowlist:write", ["hostiso-settings"])
    bad_audience = run(None, "token", "--audience", "hostiso-x", token=None, env=env)
    assert bad_audience.exit_code == 2 and "--audience" in bad_audience.stderr


MARKUP_NAMES = ["[/]", "[link=http://x]hidden[/link]", "[bold red]", "esc\x1b[31mred"]


def test_entry_names_with_markup_print_literally_in_allowlist_show(fake: FakeApis) -> None:
    # Finding: a partner entry named "[/]" crashed `allowlist show`; "[link=...]" hid its text.
    fake.allowlist["entries"] = [
        {**fake.allowlist["entries"][0], "id": f"e-{i}", "name": name}
        for i, name in enumerate(MARKUP_NAMES)
    ]
    fake.allowlist["account_id"] = "acct-[/]"
    result = run(fake, "allowlist", "show", "--account", "acct-a")
    assert result.exit_code == 0, result.output
    for name in MARKUP_NAMES[:3]:
        assert name in result.stdout
    assert "esc\\x1b[31mred" in result.stdout, "control characters are shown escaped"
    assert "\x1b" not in result.stdout.replace("\\x1b", "")
    assert "account acct-[/]" in result.stdout


def test_markup_in_isolation_rows_prints_literally_in_status(fake: FakeApis) -> None:
    row = _isolation("ep-[/]", "isolated", "standard", 3, 3)
    row["policy"]["allowed_outbound"] = [
        {"name": n, "address": "203.0.113.10"} for n in MARKUP_NAMES[:3]
    ]
    fake.timelines["ep-[/]"] = [row]
    result = run(fake, "status", "-a", "acct-a")
    assert result.exit_code == 0, result.output
    assert "ep-[/]" in result.stdout
    for name in MARKUP_NAMES[:3]:
        assert f"{name} 203.0.113.10" in result.stdout


def test_markup_in_an_api_refusal_prints_literally(fake: FakeApis) -> None:
    fake.overrides[("GET", "/v1/accounts/acct-a/tooling-allowlist")] = httpx.Response(
        403, json={"detail": "[/] [link=http://x]hidden[/link] [bold red]"}
    )
    result = run(fake, "allowlist", "show", "-a", "acct-a")
    assert result.exit_code == 1
    assert "refused (403): [/] [link=http://x]hidden[/link] [bold red]" in result.stderr


def test_status_json_keeps_markup_names_verbatim(fake: FakeApis) -> None:
    row = _isolation("ep-1", "isolated", "standard", 3, 3)
    row["policy"]["allowed_outbound"] = [{"name": "[/]", "address": "203.0.113.10"}]
    fake.timelines["ep-1"] = [row]
    result = run(fake, "status", "-a", "acct-a", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["policy"]["allowed_outbound"][0]["name"] == "[/]"


def test_status_shows_how_often_each_allowed_entry_was_used(fake: FakeApis) -> None:
    row = _isolation("ep-1", "isolated", "standard", 3, 3)
    row["policy"]["allowed_outbound"] = [
        {"name": "RMM", "address": "203.0.113.10"},
        {"name": "Relay", "address": "203.0.113.20", "protocol": "tcp", "ports": [8041]},
    ]
    row["allowlist_usage"] = [
        {
            "address": "203.0.113.10",
            "ports": [],
            "protocol": "any",
            "packets": 12,
            "bytes": 900,
            "last_seen": "2026-12-01T12:00:00Z",
        },
        {"address": "203.0.113.20", "ports": [8041], "protocol": "tcp", "packets": 0, "bytes": 0},
    ]
    fake.timelines["ep-1"] = [row]
    result = run(fake, "status", "-e", "ep-1")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "used 12 times, last at 2026-12-01 12:00:00" in out.replace("│", "").replace("  ", " ")
    assert "Relay 203.0.113.20 (not used)" in out
