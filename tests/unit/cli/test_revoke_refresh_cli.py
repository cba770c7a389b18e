"""``hostiso allowlist revoke`` and ``hostiso isolate --refresh`` against a fake of the APIs."""

from __future__ import annotations

import json

import httpx
from typer.testing import CliRunner, Result

from cli.app import CliOptions, app
from shared.auth import mint_token

SECRET = "cli-test-secret-0123456789abcdef0123"
PARTNER = mint_token(SECRET, sub="alice@msp.example", role="partner", account_id="acct-a")
SETTINGS = "http://settings.test"
ISOLATION = "http://isolation.test"
ENTRY = {
    "id": "e-1",
    "name": "RMM",
    "address": "203.0.113.10",
    "ports": [8041],
    "protocol": "tcp",
    "expires_at": None,
    "created_at": "2026-12-01T10:00:00Z",
    "created_by": "alice@msp.example",
}


class Fake:
    """The revoke, progress and refresh routes; progress answers follow ``progress`` in order."""

    def __init__(self, progress: list[dict[str, int]], endpoints: int | None = 3) -> None:
        self.progress = progress
        self.endpoints = endpoints
        self.requests: list[httpx.Request] = []
        self.refresh_status = 202

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/accounts/acct-a/tooling-allowlist/entries/e-1/revoke":
            return httpx.Response(
                202,
                json={
                    "entry_id": "e-1",
                    "revocation_id": "rev-1",
                    "entry": ENTRY,
                    "version": 7,
                    "endpoints": self.endpoints,
                },
            )
        if path == "/v1/accounts/acct-a/revocations/rev-1":
            view = self.progress.pop(0) if len(self.progress) > 1 else self.progress[0]
            return httpx.Response(
                200, json={"account_id": "acct-a", "revocation_id": "rev-1", **view}
            )
        if path == "/v1/endpoints/ep-1/isolation/refresh":
            if self.refresh_status != 202:
                detail = "a strict isolation stays strict until the SOC releases it"
                return httpx.Response(self.refresh_status, json={"detail": detail})
            return httpx.Response(202, json={"request_id": "req-refresh"})
        if path == "/v1/endpoints/ep-1/isolation":
            return httpx.Response(
                200,
                json={
                    "endpoint_id": "ep-1",
                    "account_id": "acct-a",
                    "state": "isolated",
                    "mode": "standard",
                    "policy": {"mode": "standard", "allowed_outbound": [], "sequence": 2},
                    "desired_sequence": 2,
                    "applied_sequence": 2,
                    "updated_at": "2026-12-01T10:00:00Z",
                },
            )
        return httpx.Response(404, json={"detail": f"no route {request.method} {path}"})


def run(fake: Fake, *args: str) -> Result:
    base = ["--settings-url", SETTINGS, "--isolation-url", ISOLATION, "--token", PARTNER]
    return CliRunner().invoke(
        app,
        [*base, *args],
        obj=CliOptions(transport=httpx.MockTransport(fake)),
        env={"COLUMNS": "200", "HOSTISO_TOKEN": "", "HOSTISO_ACCOUNT": ""},
    )


def progress(endpoints: int, tightened: int, applied: int, failed: int = 0) -> dict[str, int]:
    return {"endpoints": endpoints, "tightened": tightened, "applied": applied, "failed": failed}


def test_revoke_posts_the_reason_and_prints_how_many_endpoints_it_tightens() -> None:
    fake = Fake([progress(3, 0, 0)])
    result = run(fake, "allowlist", "revoke", "e-1", "--reason", "RMM compromised")
    assert result.exit_code == 0, result.output
    (post,) = [r for r in fake.requests if r.method == "POST"]
    assert json.loads(post.content) == {"reason": "RMM compromised"}
    assert "revoked 'RMM' 203.0.113.10 from acct-a (settings v7)" in result.stdout
    assert "tightening 3 isolated endpoint(s) on the priority lanes" in result.stdout


def test_revoke_without_a_reason_is_a_usage_error() -> None:
    fake = Fake([progress(0, 0, 0)])
    result = run(fake, "allowlist", "revoke", "e-1")
    assert result.exit_code == 2
    assert fake.requests == []


def test_revoke_says_so_when_the_count_is_unknown() -> None:
    result = run(
        Fake([progress(0, 0, 0)], endpoints=None), "allowlist", "revoke", "e-1", "--reason", "x"
    )
    assert result.exit_code == 0, result.output
    assert "endpoint count unknown" in result.stdout


def test_revoke_watch_polls_until_every_endpoint_applied() -> None:
    fake = Fake([progress(3, 0, 0), progress(3, 3, 1), progress(3, 3, 3)])
    result = run(
        fake, "allowlist", "revoke", "e-1", "--reason", "pwned", "--watch", "--interval", "0"
    )
    assert result.exit_code == 0, result.output
    assert "3/3 tightened, 3/3 applied" in result.stdout
    polls = [r for r in fake.requests if r.url.path.endswith("/revocations/rev-1")]
    assert len(polls) == 3
    # The entry's address, ports and protocol name what to look for.
    assert polls[0].url.params.get_list("ports") == ["8041"]
    assert polls[0].url.params["address"] == "203.0.113.10"
    assert polls[0].url.params["protocol"] == "tcp"


def test_revoke_watch_exits_4_on_timeout_and_1_when_an_agent_failed() -> None:
    slow = run(
        Fake([progress(2, 1, 0)]),
        "allowlist",
        "revoke",
        "e-1",
        "--reason",
        "x",
        "--watch",
        "--wait-timeout",
        "0",
    )
    assert slow.exit_code == 4
    assert "1/2 tightened, 0/2 applied" in slow.stderr
    failed = run(
        Fake([progress(2, 2, 1, failed=1)]),
        "allowlist",
        "revoke",
        "e-1",
        "--reason",
        "x",
        "--watch",
        "--interval",
        "0",
    )
    assert failed.exit_code == 1
    assert "1 endpoint(s) failed" in failed.stderr


def test_isolate_refresh_posts_the_refresh_and_watches_it_apply() -> None:
    fake = Fake([progress(0, 0, 0)])
    result = run(fake, "isolate", "ep-1", "--refresh", "--reason", "relay added", "--watch")
    assert result.exit_code == 0, result.output
    (post,) = [r for r in fake.requests if r.method == "POST"]
    assert post.url.path == "/v1/endpoints/ep-1/isolation/refresh"
    assert json.loads(post.content) == {"reason": "relay added"}
    assert "refresh of ep-1 accepted (request req-refresh)" in result.stdout


def test_isolate_refresh_of_a_strict_isolation_exits_1_with_the_reason() -> None:
    fake = Fake([progress(0, 0, 0)])
    fake.refresh_status = 409
    result = run(fake, "isolate", "ep-1", "--refresh")
    assert result.exit_code == 1
    assert "stays strict" in result.stderr


def test_refresh_cannot_be_strict() -> None:
    fake = Fake([progress(0, 0, 0)])
    result = run(fake, "isolate", "ep-1", "--refresh", "--strict")
    assert result.exit_code == 2 and fake.requests == []
