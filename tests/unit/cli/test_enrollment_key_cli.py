"""``hostiso enrollment-key list|rotate|revoke`` against an in-memory enforcer (httpx.MockTransport)."""

from __future__ import annotations

import json

import httpx
from typer.testing import CliRunner, Result

from cli.app import CliOptions, app
from shared.auth import mint_token

SECRET = "cli-test-secret-0123456789abcdef0123"
SOC = mint_token(SECRET, sub="soc@platform.example", role="soc")
ENFORCER = "http://enforcer.test"
KEY = "hek_0123456789abcdef_" + "s" * 43


def _key(
    key_id: str, *, active: bool, created_by: str = "soc@platform.example"
) -> dict[str, object]:
    return {
        "key_id": key_id,
        "account_id": "acct-a",
        "created_at": "2026-11-29T13:00:00Z",
        "created_by": created_by,
        "revoked_at": None if active else "2026-11-30T13:00:00Z",
        "active": active,
    }


def _enforcer(requests: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        path = request.url.path
        if path == "/v1/accounts/acct-a/enrollment-keys" and request.method == "GET":
            items = [
                _key("00000000000000aa", active=False, created_by="[/]"),
                _key("0123456789abcdef", active=True),
            ]
            return httpx.Response(200, json={"account_id": "acct-a", "items": items})
        if path == "/v1/accounts/acct-a/enrollment-keys" and request.method == "POST":
            body = {**_key("0123456789abcdef", active=True), "enrollment_key": KEY}
            return httpx.Response(201, json={**body, "revoked_key_ids": ["00000000000000aa"]})
        if path == "/v1/accounts/acct-a/enrollment-keys/0123456789abcdef":
            return httpx.Response(200, json=_key("0123456789abcdef", active=False))
        problem = {
            "type": "x",
            "title": "Not found",
            "status": 404,
            "detail": "key_id: no such key",
        }
        return httpx.Response(
            404, json=problem, headers={"content-type": "application/problem+json"}
        )

    return httpx.MockTransport(handle)


def run(requests: list[httpx.Request], *args: str) -> Result:
    options = CliOptions(transport=_enforcer(requests))
    return CliRunner().invoke(
        app,
        ["--enforcer-url", ENFORCER, "--token", SOC, *args],
        obj=options,
        env={"COLUMNS": "200", "HOSTISO_TOKEN": "", "HOSTISO_ACCOUNT": ""},
    )


def test_rotate_prints_only_the_key_on_stdout_and_calls_the_enforcer() -> None:
    requests: list[httpx.Request] = []
    result = run(requests, "enrollment-key", "rotate", "--account", "acct-a")
    assert result.exit_code == 0, result.output
    assert result.stdout == KEY + "\n"
    assert "revoked: 00000000000000aa" in result.stderr and "shown only now" in result.stderr
    [sent] = requests
    assert (sent.method, str(sent.url)) == (
        "POST",
        f"{ENFORCER}/v1/accounts/acct-a/enrollment-keys",
    )
    assert sent.headers["Authorization"] == f"Bearer {SOC}"


def test_list_shows_metadata_and_never_reads_api_strings_as_markup() -> None:
    result = run([], "enrollment-key", "list", "--account", "acct-a")
    assert result.exit_code == 0, result.output
    assert "0123456789abcdef" in result.stdout and "active" in result.stdout
    assert "[/]" in result.stdout and "revoked" in result.stdout
    as_json = run([], "enrollment-key", "list", "--account", "acct-a", "--json")
    assert [i["key_id"] for i in json.loads(as_json.stdout)["items"]][1] == "0123456789abcdef"


def test_revoke_names_the_key_and_an_unknown_key_exits_1_with_the_apis_detail() -> None:
    requests: list[httpx.Request] = []
    ok = run(requests, "enrollment-key", "revoke", "0123456789abcdef", "--account", "acct-a")
    assert ok.exit_code == 0, ok.output
    assert "Revoked enrollment key 0123456789abcdef" in ok.stdout
    assert requests[0].method == "DELETE"
    missing = run([], "enrollment-key", "revoke", "ffffffffffffffff", "--account", "acct-a")
    assert missing.exit_code == 1
    assert "key_id: no such key" in missing.stderr
