"""``hostiso``: the operator CLI over the settings and isolation REST APIs.

Exit codes: 0 ok, 1 the API refused (4xx) or an endpoint failed to apply, 2 usage,
3 API unreachable or 5xx, 4 ``watch`` timed out before every endpoint applied.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import jwt
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cli.client import ApiRefusedError, ApiUnavailableError, PlatformClient
from cli.delivery import (
    ANY_SETTLED,
    Outcome,
    Target,
    isolate_target,
    outcome,
    release_target,
    tally,
)


class ExitCode(IntEnum):
    """The CLI's exit codes, stable for scripts."""

    OK = 0
    REFUSED = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_SETTLED = 4


@dataclass
class CliOptions:
    """Global options; tests pass one as ``obj`` with an in-memory ``transport``."""

    settings_url: str = "http://127.0.0.1:8001"
    isolation_url: str = "http://127.0.0.1:8002"
    enforcer_url: str = "http://127.0.0.1:8003"
    token: str | None = None
    timeout: float = 10.0
    transport: httpx.BaseTransport | None = None


app = typer.Typer(
    name="hostiso",
    help="Operate host isolation: the Tooling Allowlist, isolations, and local infrastructure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # `--install-completion` / `--show-completion` for bash, zsh, fish and PowerShell.
    add_completion=True,
)
allowlist_app = typer.Typer(help="The account's Tooling Allowlist.", no_args_is_help=True)
account_app = typer.Typer(help="Account-wide actions.", no_args_is_help=True)
infra_app = typer.Typer(help="Local Kafka and Redis without Docker.", no_args_is_help=True)
app.add_typer(allowlist_app, name="allowlist")
app.add_typer(account_app, name="account")
app.add_typer(infra_app, name="infra")


# Markup off: names, ids and details come from the API (a partner types entry names), and a
# string such as "[/]" or "[link=...]" must print as itself, never crash or restyle the output.
# Styling is applied with rich.text.Text spans instead.
def _out() -> Console:
    return Console(highlight=False, soft_wrap=True, markup=False, emoji=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def plain(value: Any) -> Text:
    """``value`` as literal text: no markup, and control characters shown escaped (no ANSI)."""
    text = str(value)
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        text = "".join(
            ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" else ch
            for ch in text
        )
    return Text(text)


def fail(code: ExitCode, message: str) -> NoReturn:
    _err().print(Text.assemble(("error:", "bold red"), " ", plain(message)))
    raise typer.Exit(int(code))


def cli_version() -> str:
    """The installed hostiso version (the package metadata)."""
    try:
        return package_version("hostiso")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hostiso {cli_version()}")
        raise typer.Exit(0)


VersionOption = Annotated[
    bool,
    typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
]


@app.callback()
def main_options(
    ctx: typer.Context,
    settings_url: Annotated[
        str, typer.Option(envvar="HOSTISO_SETTINGS_URL", help="Settings API base URL.")
    ] = "http://127.0.0.1:8001",
    isolation_url: Annotated[
        str, typer.Option(envvar="HOSTISO_ISOLATION_URL", help="Isolation API base URL.")
    ] = "http://127.0.0.1:8002",
    enforcer_url: Annotated[
        str, typer.Option(envvar="HOSTISO_ENFORCER_URL", help="Enforcer API base URL.")
    ] = "http://127.0.0.1:8003",
    token: Annotated[
        str | None,
        typer.Option(envvar="HOSTISO_TOKEN", help="Bearer JWT (dev: `hostiso token`)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="HTTP timeout in seconds.")] = 10.0,
    version: VersionOption = False,
) -> None:
    """Operate host isolation over the platform's REST APIs."""
    preset = ctx.obj if isinstance(ctx.obj, CliOptions) else CliOptions()
    ctx.obj = CliOptions(
        settings_url=settings_url,
        isolation_url=isolation_url,
        enforcer_url=enforcer_url,
        token=token,
        timeout=timeout,
        transport=preset.transport,
    )


def _options(ctx: typer.Context) -> CliOptions:
    options = ctx.find_object(CliOptions)
    return options if options is not None else CliOptions()


def _token_claims(token: str) -> dict[str, Any]:
    # Unverified on purpose: only to default the partner's account; the API verifies the token.
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims


@contextmanager
def platform(ctx: typer.Context) -> Iterator[PlatformClient]:
    """A client for this invocation; API refusals and outages become exit codes with the API's detail."""
    options = _options(ctx)
    if not options.token:
        fail(
            ExitCode.USAGE,
            "no token: pass --token or set HOSTISO_TOKEN (dev: export HOSTISO_TOKEN=$(hostiso token))",
        )
    client = PlatformClient(
        settings_url=options.settings_url,
        isolation_url=options.isolation_url,
        enforcer_url=options.enforcer_url,
        token=options.token,
        timeout=options.timeout,
        transport=options.transport,
    )
    try:
        yield client
    except ApiRefusedError as exc:
        fail(ExitCode.REFUSED, f"refused ({exc.status}): {exc.detail}")
    except ApiUnavailableError as exc:
        fail(ExitCode.UNAVAILABLE, str(exc))
    finally:
        client.close()


def resolve_account(ctx: typer.Context, account: str | None) -> str:
    if account:
        return account
    options = _options(ctx)
    claimed = _token_claims(options.token or "").get("account_id")
    if isinstance(claimed, str) and claimed:
        return claimed
    fail(ExitCode.USAGE, "no account: pass --account or set HOSTISO_ACCOUNT")


AccountOption = Annotated[
    str | None,
    typer.Option(
        "--account",
        "-a",
        envvar="HOSTISO_ACCOUNT",
        help="Account id (default: the partner token's account).",
    ),
]
IfMatchOption = Annotated[
    str | None,
    typer.Option(help="Only if the allowlist is still at this version (412 otherwise)."),
]
# Shared by every command: the API's answer as JSON on stdout instead of a table or sentence.
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
HostOption = Annotated[
    list[str] | None,
    typer.Option(
        "--host",
        help="Endpoint by hostname (exact, case-insensitive), resolved through the account's"
        " inventory; an unknown or ambiguous name is refused with the candidates. Repeatable.",
    ),
]


def _when(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return "—"
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _print_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2, sort_keys=True))


# --- allowlist ---------------------------------------------------------------------------


def _print_allowlist(body: dict[str, Any]) -> None:
    out = _out()
    switch = ("On", "green") if body.get("enabled") else ("Off", "yellow")
    entries = body.get("entries") or []
    out.print(
        Text.assemble(
            "Tooling Connections: ",
            switch,
            "   account ",
            plain(body.get("account_id")),
            "   version ",
            plain(body.get("version")),
            f"   {len(entries)} entries",
        )
    )
    if not entries:
        out.print("No entries.")
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("Name", "Address", "Added by", "Added", "Entry id"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            plain(entry.get("name", "")),
            plain(entry.get("address", "") + _entry_reach(entry)),
            plain(entry.get("created_by", "")),
            plain(_when(entry.get("created_at"))),
            plain(entry.get("id", "")),
        )
    out.print(table)
    out.print("Changes reach only endpoints isolated afterwards.")


def _entry_reach(entry: dict[str, Any]) -> str:
    """Allowlist v2: `` tcp/8041,443 until …`` after the address; nothing for a v1 entry."""
    reach = ""
    protocol = entry.get("protocol") or "any"
    if protocol != "any":
        ports = ",".join(str(p) for p in entry.get("ports") or [])
        reach += f" {protocol}" + (f"/{ports}" if ports else "")
    if entry.get("expires_at"):
        reach += f" until {_when(entry.get('expires_at'))}"
    return reach


@allowlist_app.command("show")
def allowlist_show(
    ctx: typer.Context, account: AccountOption = None, as_json: JsonOption = False
) -> None:
    """Show the switch and the entries."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        answer = api.get_allowlist(account_id)
    if as_json:
        _print_json(answer.body)
    else:
        _print_allowlist(answer.body)


def _set_enabled(
    ctx: typer.Context, account: str | None, if_match: str | None, on: bool, as_json: bool
) -> None:
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        api.set_enabled(account_id, on, if_match=if_match)
        body = api.get_allowlist(account_id).body
    if as_json:
        _print_json(body)
        return
    _out().print(
        plain(
            f"Tooling Connections {'on' if on else 'off'} for {account_id} (version {body.get('version')}); "
            "endpoints already isolated keep their frozen allowlist."
        )
    )


@allowlist_app.command("enable")
def allowlist_enable(
    ctx: typer.Context,
    account: AccountOption = None,
    if_match: IfMatchOption = None,
    as_json: JsonOption = False,
) -> None:
    """Switch Tooling Connections on."""
    _set_enabled(ctx, account, if_match, True, as_json)


@allowlist_app.command("disable")
def allowlist_disable(
    ctx: typer.Context,
    account: AccountOption = None,
    if_match: IfMatchOption = None,
    as_json: JsonOption = False,
) -> None:
    """Switch Tooling Connections off."""
    _set_enabled(ctx, account, if_match, False, as_json)


@allowlist_app.command("add")
def allowlist_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Display name, e.g. 'ConnectWise Automate'.")],
    address: Annotated[
        str,
        typer.Argument(help="Static IPv4/IPv6 address or narrow prefix of a self-hosted RMM."),
    ],
    account: AccountOption = None,
    if_match: IfMatchOption = None,
    as_json: JsonOption = False,
    port: Annotated[
        list[int] | None,
        typer.Option("--port", help="Allow only this port (repeatable; needs --protocol)."),
    ] = None,
    protocol: Annotated[
        str | None, typer.Option("--protocol", help="tcp, udp or any (default any).")
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="RFC 3339 time the entry stops (at most 90 days ahead)."),
    ] = None,
) -> None:
    """Add an entry (static addresses or narrow prefixes only: cloud RMMs are not supported)."""
    account_id = resolve_account(ctx, account)
    options: dict[str, Any] = {}
    if port:
        options["ports"] = port
    if protocol is not None:
        options["protocol"] = protocol
    if expires is not None:
        options["expires_at"] = expires
    with platform(ctx) as api:
        body = api.add_entry(account_id, name, address, if_match=if_match, options=options).body
    if as_json:
        _print_json(body)
        return
    entry_id = body.get("id") if isinstance(body, dict) else None
    _out().print(plain(f"Added {name!r} {address}" + (f" (entry {entry_id})" if entry_id else "")))


@allowlist_app.command("rename")
def allowlist_rename(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="Entry id (see `allowlist show`).")],
    name: Annotated[str, typer.Argument(help="New display name.")],
    account: AccountOption = None,
    if_match: IfMatchOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rename an entry."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        answer = api.rename_entry(account_id, entry_id, name, if_match=if_match)
    if as_json:
        _print_json(answer.body)
        return
    _out().print(plain(f"Renamed entry {entry_id} to {name!r}"))


@allowlist_app.command("remove")
def allowlist_remove(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="Entry id (see `allowlist show`).")],
    account: AccountOption = None,
    if_match: IfMatchOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove an entry."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        answer = api.remove_entry(account_id, entry_id, if_match=if_match)
    if as_json:
        # 204 has no body: the JSON says what was removed.
        _print_json(answer.body if answer.body is not None else {"removed": entry_id})
        return
    _out().print(plain(f"Removed entry {entry_id}"))


# --- isolation ---------------------------------------------------------------------------

ReasonOption = Annotated[str, typer.Option(help="Why (recorded in the audit trail).")]
WatchOption = Annotated[bool, typer.Option("--watch", help="Wait until every agent applied.")]
TimeoutOption = Annotated[float, typer.Option("--wait-timeout", help="Seconds to wait.")]
IntervalOption = Annotated[float, typer.Option(help="Seconds between polls.")]


def _sequence(api: PlatformClient, endpoint_id: str) -> int:
    value = api.get_isolation(endpoint_id).get("desired_sequence")
    return value if isinstance(value, int) else 0


@app.command()
def isolate(
    ctx: typer.Context,
    endpoints: Annotated[list[str] | None, typer.Argument(help="Endpoint ids.")] = None,
    host: HostOption = None,
    account: AccountOption = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Platform traffic only; ignores the allowlist.")
    ] = False,
    reason: ReasonOption = "",
    watch_: WatchOption = False,
    wait_timeout: TimeoutOption = 120.0,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
    refresh: Annotated[
        bool,
        typer.Option(
            "--refresh",
            help="Standard isolations take the current allowlist, without a release (audited).",
        ),
    ] = False,
) -> None:
    """Isolate endpoints (standard: frozen allowlist; --strict: platform only)."""
    if refresh and strict:
        fail(ExitCode.USAGE, "--refresh is for standard isolations; it cannot be --strict")
    mode = "strict" if strict else "standard"
    targets: dict[str, Target] = {}
    accepted: list[dict[str, Any]] = []
    with platform(ctx) as api:
        for endpoint_id in target_endpoints(ctx, api, endpoints, host, account):
            before = _sequence(api, endpoint_id) if watch_ else 0
            if refresh:
                _refresh(api, endpoint_id, reason)
                targets[endpoint_id] = isolate_target("standard", before)
                continue
            answer = api.isolate(endpoint_id, mode=mode, reason=reason)
            targets[endpoint_id] = isolate_target(mode, before)
            accepted.append({"endpoint_id": endpoint_id, **_dict(answer.body)})
            if not as_json:
                _out().print(
                    plain(
                        f"{mode} isolation of {endpoint_id} accepted (request {answer.body.get('request_id')})"
                    )
                )
        if watch_:
            _watch(
                api,
                lambda: {eid: api.get_isolation(eid) for eid in targets},
                targets,
                wait_timeout,
                interval,
                accepted=accepted if as_json else None,
            )
        elif as_json:
            _print_json(accepted)


@app.command()
def release(
    ctx: typer.Context,
    endpoints: Annotated[list[str] | None, typer.Argument(help="Endpoint ids.")] = None,
    host: HostOption = None,
    account: AccountOption = None,
    watch_: WatchOption = False,
    wait_timeout: TimeoutOption = 120.0,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Release isolated endpoints (a strict isolation only by the SOC)."""
    targets: dict[str, Target] = {}
    accepted: list[dict[str, Any]] = []
    with platform(ctx) as api:
        for endpoint_id in target_endpoints(ctx, api, endpoints, host, account):
            before = _sequence(api, endpoint_id) if watch_ else 0
            answer = api.release(endpoint_id)
            targets[endpoint_id] = release_target(before)
            accepted.append({"endpoint_id": endpoint_id, **_dict(answer.body)})
            if not as_json:
                _out().print(
                    plain(
                        f"release of {endpoint_id} accepted (request {answer.body.get('request_id')})"
                    )
                )
        if watch_:
            _watch(
                api,
                lambda: {eid: api.get_isolation(eid) for eid in targets},
                targets,
                wait_timeout,
                interval,
                accepted=accepted if as_json else None,
            )
        elif as_json:
            _print_json(accepted)


@account_app.command("strict")
def account_strict(
    ctx: typer.Context,
    account: AccountOption = None,
    reason: ReasonOption = "RMM compromised",
    keep_allowlist: Annotated[
        bool, typer.Option("--keep-allowlist", help="Leave Tooling Connections as they are.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    watch_: WatchOption = False,
    wait_timeout: TimeoutOption = 120.0,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """RMM compromised: strictly isolate every isolated endpoint and switch the allowlist off."""
    account_id = resolve_account(ctx, account)
    if not yes and not typer.confirm(
        f"Strictly isolate every isolated endpoint of {account_id}"
        + ("" if keep_allowlist else " and switch Tooling Connections off")
        + "?",
        default=False,
    ):
        fail(ExitCode.USAGE, "not confirmed (pass --yes to skip the question)")
    with platform(ctx) as api:
        before = {row["endpoint_id"]: row for row in api.list_isolations(account_id)}
        answer = api.strict_account(account_id, reason=reason, disable_allowlist=not keep_allowlist)
        covered = answer.body.get("endpoints")
        if as_json and not watch_:
            _print_json(answer.body)
        elif not as_json:
            _out().print(
                plain(
                    f"strict isolation of {covered} endpoint(s) of {account_id} accepted "
                    f"(request {answer.body.get('request_id')})"
                    + ("" if keep_allowlist else "; Tooling Connections off")
                )
            )
        if watch_:
            targets = {
                eid: isolate_target(
                    "strict",
                    _int(row.get("desired_sequence")) if row.get("mode") != "strict" else 0,
                )
                for eid, row in before.items()
            }
            _watch(
                api,
                _account_fetcher(api, account_id, list(targets)),
                targets,
                wait_timeout,
                interval,
                accepted=[_dict(answer.body)] if as_json else None,
            )


def _refresh(api: PlatformClient, endpoint_id: str, reason: str) -> Any:
    answer = api.refresh(endpoint_id, reason=reason)
    _out().print(
        plain(
            f"refresh of {endpoint_id} accepted (request {answer.body.get('request_id')}): "
            "it takes the account's current allowlist without a release"
        )
    )
    return answer


@allowlist_app.command("revoke")
def allowlist_revoke(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="Entry id (see `allowlist show`).")],
    reason: Annotated[str, typer.Option(help="Why the tool is compromised (required; audited).")],
    account: AccountOption = None,
    watch_: Annotated[
        bool, typer.Option("--watch", help="Show tightened/applied until every agent applied.")
    ] = False,
    wait_timeout: TimeoutOption = 120.0,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """This tool is compromised: remove the entry and cut it from every isolated endpoint now."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        answer = api.revoke_entry(account_id, entry_id, reason=reason)
        body: dict[str, Any] = answer.body if isinstance(answer.body, dict) else {}
        if as_json:
            _print_json(body)
        entry = body.get("entry") if isinstance(body.get("entry"), dict) else {}
        count = body.get("endpoints")
        what = f"{(entry or {}).get('name')!r} {(entry or {}).get('address')}"
        tightening = (
            f"tightening {count} isolated endpoint(s) on the priority lanes"
            if isinstance(count, int)
            else "endpoint count unknown (isolation service not reachable in time); "
            "the revocation happens regardless"
        )
        if not as_json:
            _out().print(
                plain(
                    f"revoked {what} from {account_id} (settings v{body.get('version')}): "
                    f"{tightening} (revocation {body.get('revocation_id')})"
                )
            )
        if watch_:
            _watch_revocation(
                api,
                account_id,
                str(body.get("revocation_id")),
                entry or {},
                wait_timeout,
                interval,
            )


def _watch_revocation(
    api: PlatformClient,
    account_id: str,
    revocation_id: str,
    entry: dict[str, Any],
    wait_timeout: float,
    interval: float,
) -> None:
    """Two bars, tightened and applied, until every affected endpoint applied its new policy."""
    deadline = time.monotonic() + wait_timeout
    console = _err()
    progress_view: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as progress:
        tightened = progress.add_task("tightened", total=None, detail="")
        applied = progress.add_task("applied", total=None, detail="")
        while True:
            progress_view = api.revocation_progress(account_id, revocation_id, entry)
            total = _int(progress_view.get("endpoints"))
            failed = _int(progress_view.get("failed"))
            progress.update(tightened, total=total, completed=_int(progress_view.get("tightened")))
            progress.update(
                applied,
                total=total,
                completed=_int(progress_view.get("applied")) + failed,
                detail=f"{failed} failed" if failed else "",
            )
            if _revocation_settled(progress_view) or time.monotonic() >= deadline:
                break
            time.sleep(interval)
    total = _int(progress_view.get("endpoints"))
    done = _int(progress_view.get("applied"))
    failed = _int(progress_view.get("failed"))
    summary = (
        f"{_int(progress_view.get('tightened'))}/{total} tightened, {done}/{total} applied"
        + (f", {failed} failed" if failed else "")
    )
    _out().print(plain(summary))
    if failed:
        fail(ExitCode.REFUSED, f"{failed} endpoint(s) failed to apply the tightened policy")
    if not _revocation_settled(progress_view):
        fail(ExitCode.NOT_SETTLED, f"timed out after {wait_timeout:g}s: {summary}")


def _revocation_settled(view: dict[str, Any]) -> bool:
    total = _int(view.get("endpoints"))
    return (
        _int(view.get("tightened")) == total
        and _int(view.get("applied")) + _int(view.get("failed")) == total
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _account_fetcher(
    api: PlatformClient, account_id: str, known: list[str]
) -> Callable[[], dict[str, dict[str, Any]]]:
    # Released endpoints leave the account's list; ask for those one by one.
    def fetch() -> dict[str, dict[str, Any]]:
        rows = {
            row["endpoint_id"]: row
            for row in api.list_isolations(account_id)
            if "endpoint_id" in row
        }
        for endpoint_id in known:
            if endpoint_id not in rows:
                rows[endpoint_id] = api.get_isolation(endpoint_id)
        return rows

    return fetch


def _watch(
    api: PlatformClient,
    fetch: Callable[[], dict[str, dict[str, Any]]],
    targets: dict[str, Target],
    wait_timeout: float,
    interval: float,
    *,
    accepted: list[dict[str, Any]] | None = None,
) -> None:
    """Poll until every target is applied; a progress bar when several endpoints are involved.

    With ``accepted`` (``--json``) the result is JSON on stdout: the accepted requests and the
    endpoints' final isolation states, as the API answered them.
    """
    deadline = time.monotonic() + wait_timeout
    console = _err()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=len(targets) < 2 or not console.is_terminal,
    ) as progress:
        task = progress.add_task("applied", total=len(targets), detail="")
        while True:
            rows = fetch()
            outcomes = {eid: outcome(rows.get(eid, {}), target) for eid, target in targets.items()}
            counts = tally(list(outcomes.values()))
            progress.update(
                task,
                completed=counts.done + counts.failed,
                detail=f"{counts.failed} failed" if counts.failed else "",
            )
            if counts.finished or time.monotonic() >= deadline:
                break
            time.sleep(interval)
    final = [rows.get(eid, {"endpoint_id": eid}) for eid in targets]
    if accepted is not None:
        _print_json({"accepted": accepted, "isolations": final})
    else:
        _print_isolations(final)
    failed = [eid for eid, o in outcomes.items() if o is Outcome.FAILED]
    waiting = [eid for eid, o in outcomes.items() if o is Outcome.WAITING]
    if failed:
        fail(ExitCode.REFUSED, f"{len(failed)} endpoint(s) failed to apply: {', '.join(failed)}")
    if waiting:
        fail(
            ExitCode.NOT_SETTLED,
            f"timed out after {wait_timeout:g}s; still waiting for {', '.join(waiting)}",
        )
    if accepted is None:
        _out().print(f"all {len(targets)} endpoint(s) applied")


def _entry_key(entry: dict[str, Any]) -> tuple[str, str, tuple[int, ...]]:
    ports = tuple(sorted(int(p) for p in entry.get("ports") or ()))
    return (str(entry.get("address")), str(entry.get("protocol") or "any"), ports)


def _usage_by_entry(row: dict[str, Any]) -> dict[tuple[str, str, tuple[int, ...]], str]:
    """ " (used N times, last at T)" per entry of an isolated endpoint's policy in force."""
    if row.get("state") != "isolated":
        return {}
    notes: dict[tuple[str, str, tuple[int, ...]], str] = {}
    for used in row.get("allowlist_usage") or []:
        if not isinstance(used, dict):
            continue
        packets = used.get("packets") or 0
        last = f", last at {_when(used['last_seen'])}" if used.get("last_seen") else ""
        notes[_entry_key(used)] = f" (used {packets} times{last})" if packets else " (not used)"
    return notes


def _print_isolations(rows: list[dict[str, Any]]) -> None:
    table = Table(show_edge=False, header_style="bold")
    for column in (
        "Endpoint",
        "State",
        "Mode",
        "Allowed outbound",
        "Settings v",
        "Seq desired/applied",
        "Updated",
    ):
        table.add_column(column)
    for row in rows:
        policy = row.get("policy") if isinstance(row.get("policy"), dict) else None
        peers = (policy or {}).get("allowed_outbound") or []
        in_force = policy is not None and policy.get("mode") not in (None, "none")
        usage = _usage_by_entry(row)
        allowed = (
            ", ".join(
                f"{p.get('name')} {p.get('address')}{usage.get(_entry_key(p), '')}" for p in peers
            )
            if peers
            else ("platform only" if in_force else "—")
        )
        table.add_row(
            plain(row.get("endpoint_id", "")),
            plain(row.get("state", "?")),
            plain(row.get("mode") or "—"),
            plain(allowed),
            plain(policy.get("settings_version")) if in_force and policy else plain("—"),
            plain(f"{row.get('desired_sequence', 0)}/{row.get('applied_sequence', 0)}"),
            plain(_when(row.get("updated_at"))),
        )
    _out().print(table)


@app.command()
def status(
    ctx: typer.Context,
    account: AccountOption = None,
    endpoint: Annotated[
        list[str] | None, typer.Option("--endpoint", "-e", help="Only these endpoints.")
    ] = None,
    host: HostOption = None,
    as_json: JsonOption = False,
) -> None:
    """A table of the account's isolations (or of the given endpoints)."""
    with platform(ctx) as api:
        if endpoint or host:
            ids = list(endpoint or []) + resolve_hosts(ctx, api, host or [], account)
            rows = [api.get_isolation(eid) for eid in ids]
        else:
            rows = api.list_isolations(resolve_account(ctx, account))
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _out().print("No isolated or pending endpoints.")
        return
    _print_isolations(rows)


@app.command()
def watch(
    ctx: typer.Context,
    account: AccountOption = None,
    endpoint: Annotated[
        list[str] | None, typer.Option("--endpoint", "-e", help="Only these endpoints.")
    ] = None,
    wait_timeout: TimeoutOption = 120.0,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Poll until every endpoint reports its newest policy applied (exit 4 on timeout)."""
    with platform(ctx) as api:
        if endpoint:
            ids = list(endpoint)

            def fetch() -> dict[str, dict[str, Any]]:
                return {eid: api.get_isolation(eid) for eid in ids}

        else:
            account_id = resolve_account(ctx, account)
            ids = [
                row["endpoint_id"]
                for row in api.list_isolations(account_id)
                if "endpoint_id" in row
            ]
            fetch = _account_fetcher(api, account_id, ids)
        if not ids:
            if as_json:
                _print_json({"accepted": [], "isolations": []})
            else:
                _out().print("Nothing to watch: no isolated or pending endpoints.")
            return
        _watch(
            api,
            fetch,
            dict.fromkeys(ids, ANY_SETTLED),
            wait_timeout,
            interval,
            accepted=[] if as_json else None,
        )


# --- inventory: every enrolled endpoint, by hostname -----------------------------------


class EndpointState(StrEnum):
    """The isolation states an endpoint can be listed by (completion offers them)."""

    not_isolated = "not_isolated"
    isolation_pending = "isolation_pending"
    isolated = "isolated"
    release_pending = "release_pending"
    failed = "failed"


StateOption = Annotated[
    EndpointState | None, typer.Option("--state", help="Only endpoints in this state.")
]
_CANDIDATES_SHOWN = 20


def _dict(body: Any) -> dict[str, Any]:
    return body if isinstance(body, dict) else {}


def _candidates(rows: list[dict[str, Any]]) -> str:
    shown = [
        f"{row.get('hostname')} ({row.get('endpoint_id')}, {row.get('state')})"
        for row in rows[:_CANDIDATES_SHOWN]
    ]
    more = len(rows) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def resolve_hosts(
    ctx: typer.Context, api: PlatformClient, hosts: list[str], account: str | None
) -> list[str]:
    """The endpoint id of each hostname; exit 1 listing the candidates if not exactly one."""
    if not hosts:
        return []
    account_id = resolve_account(ctx, account)
    ids: list[str] = []
    for name in hosts:
        rows = api.all_endpoints(account_id, q=name)
        exact = [r for r in rows if str(r.get("hostname", "")).lower() == name.lower()]
        if len(exact) == 1:
            ids.append(str(exact[0]["endpoint_id"]))
            continue
        if len(exact) > 1:
            fail(
                ExitCode.REFUSED,
                f"--host {name!r} is ambiguous: {len(exact)} endpoints of {account_id} have that"
                f" hostname: {_candidates(exact)}; pass the endpoint id instead",
            )
        if rows:
            fail(
                ExitCode.REFUSED,
                f"--host {name!r}: no endpoint of {account_id} has exactly that hostname;"
                f" candidates: {_candidates(rows)}",
            )
        fail(ExitCode.REFUSED, f"--host {name!r}: no endpoint of {account_id} has that hostname")
    return ids


def target_endpoints(
    ctx: typer.Context,
    api: PlatformClient,
    endpoints: list[str] | None,
    hosts: list[str] | None,
    account: str | None,
) -> list[str]:
    """Endpoint ids given as arguments and by ``--host``; at least one (else a usage error)."""
    ids = list(endpoints or []) + resolve_hosts(ctx, api, hosts or [], account)
    if not ids:
        fail(ExitCode.USAGE, "name at least one endpoint: an endpoint id or --host HOSTNAME")
    return ids


def _ago(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return "never"
    return _when(value)


def _print_endpoints(rows: list[dict[str, Any]]) -> None:
    table = Table(show_edge=False, header_style="bold")
    for column in ("Hostname", "Platform", "State", "Mode", "Last seen", "Endpoint"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            plain(row.get("hostname", "")),
            plain(row.get("platform", "")),
            plain(row.get("state", "?")),
            plain(row.get("mode") or "—"),
            plain(_ago(row.get("last_seen"))),
            plain(row.get("endpoint_id", "")),
        )
    _out().print(table)


@app.command()
def endpoints(
    ctx: typer.Context,
    account: AccountOption = None,
    state: StateOption = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Hostname substring (case-insensitive).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Every enrolled endpoint of the account: hostname, platform, state, mode, last seen."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        rows = api.all_endpoints(account_id, state=state.value if state else None, q=host)
    if as_json:
        # Every page's items, as one page: the listing followed next_cursor to the end.
        _print_json({"items": rows, "next_cursor": None})
        return
    if not rows:
        _out().print(plain(f"No endpoints of {account_id} match."))
        return
    _print_endpoints(rows)
    _out().print(plain(f"{len(rows)} endpoint(s) of {account_id}"))


def _print_timeline(endpoint_id: str, items: list[dict[str, Any]]) -> None:
    if not items:
        _out().print(plain(f"No policies issued to {endpoint_id} yet."))
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("Seq", "Issued", "By", "Mode", "Settings v", "Reason", "Agent", "Detail"):
        table.add_column(column)
    for item in items:
        table.add_row(
            plain(item.get("sequence", "")),
            plain(_when(item.get("issued_at"))),
            plain(item.get("issued_by", "")),
            plain("release" if item.get("mode") == "none" else item.get("mode", "")),
            plain(item.get("settings_version", "")),
            plain(item.get("reason") or "—"),
            plain(item.get("status", "")),
            plain(item.get("detail") or ""),
        )
    _out().print(table)


@app.command()
def timeline(
    ctx: typer.Context,
    endpoint: Annotated[str | None, typer.Argument(help="Endpoint id.")] = None,
    host: HostOption = None,
    account: AccountOption = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="Newest policies shown.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """The policies issued to an endpoint: when, who, why, mode, and what the agent answered."""
    with platform(ctx) as api:
        (endpoint_id, *more) = target_endpoints(
            ctx, api, [endpoint] if endpoint else None, host, account
        )
        if more:
            fail(ExitCode.USAGE, "timeline shows one endpoint at a time")
        body = _dict(api.isolation_timeline(endpoint_id, limit=limit).body)
    if as_json:
        _print_json(body)
        return
    items = body.get("items")
    _print_timeline(endpoint_id, [i for i in items if isinstance(i, dict)] if items else [])


# --- enrollment keys (enforcer) ----------------------------------------------------------

enrollment_key_app = typer.Typer(
    help="The account's enrollment keys (the enforcer issues them; each is shown once).",
    no_args_is_help=True,
)
app.add_typer(enrollment_key_app, name="enrollment-key")


def _print_enrollment_keys(body: dict[str, Any]) -> None:
    out = _out()
    items = body.get("items") or []
    if not items:
        out.print(f"No enrollment keys issued for account {body.get('account_id')}.", markup=False)
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("Key id", "State", "Created", "Created by", "Revoked"):
        table.add_column(column)
    for item in items:
        # Text cells are never read as markup: key metadata (a JWT subject) comes from the API.
        table.add_row(
            *(
                Text(cell)
                for cell in (
                    str(item.get("key_id", "")),
                    "active" if item.get("active") else "revoked",
                    _when(item.get("created_at")),
                    str(item.get("created_by", "")),
                    _when(item.get("revoked_at")),
                )
            )
        )
    out.print(table)


@enrollment_key_app.command("list")
def enrollment_key_list(
    ctx: typer.Context, account: AccountOption = None, as_json: JsonOption = False
) -> None:
    """List the account's enrollment keys (metadata only; no service can show a key again)."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        answer = api.list_enrollment_keys(account_id)
    if as_json:
        _print_json(answer.body)
    else:
        _print_enrollment_keys(answer.body)


@enrollment_key_app.command("rotate")
def enrollment_key_rotate(
    ctx: typer.Context, account: AccountOption = None, as_json: JsonOption = False
) -> None:
    """Issue a new enrollment key and revoke every earlier one (enrolled agents keep working)."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        answer = api.rotate_enrollment_key(account_id)
    body = answer.body
    if as_json:
        _print_json(body)
        return
    revoked = ", ".join(body.get("revoked_key_ids") or []) or "none"
    err = _err()
    err.print(
        f"New enrollment key {body.get('key_id')} for account {account_id}; revoked: {revoked}.\n"
        "It is shown only now: give it to agents in HOSTISO_AGENT_ENROLLMENT_KEY or a root-only"
        " file, never on a command line.",
        markup=False,
    )
    # The key alone on stdout, so `KEY=$(hostiso enrollment-key rotate)` captures only it.
    typer.echo(str(body.get("enrollment_key", "")))


@enrollment_key_app.command("revoke")
def enrollment_key_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key id (from `enrollment-key list`).")],
    account: AccountOption = None,
    as_json: JsonOption = False,
) -> None:
    """Refuse the key for new enrollments from now on (agents enrolled with it keep working)."""
    account_id = resolve_account(ctx, account)
    with platform(ctx) as api:
        answer = api.revoke_enrollment_key(account_id, key_id)
    if as_json:
        _print_json(answer.body)
    else:
        _out().print(
            f"Revoked enrollment key {key_id} of account {account_id} at "
            f"{_when(answer.body.get('revoked_at'))}.",
            markup=False,
        )


# --- dev token and local infrastructure --------------------------------------------------


@app.command()
def token(
    role: Annotated[str, typer.Option(help="partner, soc or service")] = "soc",
    sub: Annotated[str, typer.Option(help="Subject (who).")] = "dev-operator",
    account_id: Annotated[str | None, typer.Option(help="The partner's account.")] = None,
    ttl: Annotated[
        int, typer.Option(help="Lifetime in seconds (at most the configured max).")
    ] = 3600,
    scope: Annotated[
        list[str] | None,
        typer.Option(help="A service token's scope, repeatable, e.g. allowlist:write."),
    ] = None,
    audience: Annotated[
        list[str] | None,
        typer.Option(help="Services the token is for, repeatable (default: all three)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Dev only (HOSTISO_DEV=1): print a token signed with the dev JWT secret."""
    from shared.auth import ALL_AUDIENCES, TokenPolicy, mint_token
    from shared.config import ConfigError, ServiceSettings

    if role not in ("partner", "soc", "service"):
        fail(ExitCode.USAGE, "--role must be partner, soc or service")
    try:
        settings = ServiceSettings()
        if not settings.dev:
            fail(ExitCode.USAGE, "`hostiso token` is a dev tool: set HOSTISO_DEV=1")
        secret = settings.require_secret("jwt_secret")
    except (ConfigError, ValueError) as exc:
        fail(ExitCode.USAGE, str(exc))
    # The services refuse longer-lived tokens (HOSTISO_JWT_MAX_LIFETIME_S and the service max).
    longest = TokenPolicy(
        secret,
        audience="",
        max_lifetime_s=settings.jwt_max_lifetime_s,
        service_max_lifetime_s=settings.jwt_service_max_lifetime_s,
    ).max_lifetime_for(role)
    if not 0 < ttl <= longest:
        fail(ExitCode.USAGE, f"--ttl: must be between 1 and {longest} seconds for role {role}")
    unknown = sorted(set(audience or ()) - set(ALL_AUDIENCES))
    if unknown:
        fail(ExitCode.USAGE, f"--audience: unknown {unknown}; one of {list(ALL_AUDIENCES)}")
    if role == "service" and not scope:
        fail(ExitCode.USAGE, "--scope: a service token needs at least one scope")
    try:
        minted = mint_token(
            secret,
            sub=sub,
            role=role,  # type: ignore[arg-type]
            account_id=account_id,
            ttl_s=ttl,
            audience=audience or ALL_AUDIENCES,
            scopes=scope or (),
        )
    except ValueError as exc:
        fail(ExitCode.USAGE, f"--account-id: {exc}")
    if as_json:
        _print_json({"token": minted, "role": role, "sub": sub, "account_id": account_id})
    else:
        typer.echo(minted)


def _run_dir() -> Path:
    return Path(os.environ.get("HOSTISO_RUN_DIR", ".run"))


def spawn_infra(args: list[str], *, detach: bool, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m shared.infra``; detached, it gets its own session and outlives us."""
    command = [sys.executable, "-m", "shared.infra", *args]
    if not detach:
        return subprocess.Popen(command)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@infra_app.command("up")
def infra_up(
    nodes: Annotated[int, typer.Option(help="Kafka nodes: 1, or 3 for RF 3 / min ISR 2.")] = 1,
    topic_prefix: Annotated[
        str, typer.Option(help="Create the topics with this prefix.")
    ] = "hostiso.",
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background; stop with `infra down`.")
    ] = False,
    ready_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for readiness (--detach).")
    ] = 180.0,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="With --detach: print {pid, log, env} as JSON once ready."),
    ] = False,
) -> None:
    """Start a local Kafka broker and redis-server (delegates to `python -m shared.infra up`)."""
    if as_json and not detach:
        fail(ExitCode.USAGE, "--json needs --detach (in the foreground the log is the output)")
    args = ["up", "--nodes", str(nodes), "--topic-prefix", topic_prefix]
    run_dir = _run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "infra.log"
    pid_path = run_dir / "infra.pid"
    if not detach:
        proc = spawn_infra(args, detach=False, log_path=log_path)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # The child got the same SIGINT and is cleaning up its broker; wait for it.
            code = proc.wait()
        raise typer.Exit(code)
    if pid_path.exists():
        fail(
            ExitCode.USAGE,
            f"already running (pid {pid_path.read_text().strip()}); `hostiso infra down` first",
        )
    offset = log_path.stat().st_size if log_path.exists() else 0
    proc = spawn_infra(args, detach=True, log_path=log_path)
    pid_path.write_text(str(proc.pid))
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")[offset:] if log_path.exists() else ""
        if "Ctrl-C stops everything" in text:
            env_lines = [line for line in text.splitlines() if "HOSTISO_" in line]
            if as_json:
                _print_json({"pid": proc.pid, "log": str(log_path), "env": _env_of(env_lines)})
                return
            for line in env_lines:
                _out().print(line)
            _out().print(
                f"running in the background (pid {proc.pid}, log {log_path}); stop: hostiso infra down"
            )
            return
        if proc.poll() is not None:
            pid_path.unlink(missing_ok=True)
            fail(ExitCode.UNAVAILABLE, f"infrastructure exited ({proc.returncode}); see {log_path}")
        time.sleep(0.2)
    fail(
        ExitCode.UNAVAILABLE,
        f"not ready after {ready_timeout:g}s; see {log_path} (stop: hostiso infra down)",
    )


def _env_of(lines: list[str]) -> dict[str, str]:
    """``HOSTISO_X=value`` pairs of the infrastructure's announcement (``export`` allowed)."""
    env: dict[str, str] = {}
    for line in lines:
        for word in line.split():
            name, sep, value = word.partition("=")
            if sep and name.startswith("HOSTISO_"):
                env[name] = value
    return env


@infra_app.command("down")
def infra_down(
    stop_timeout: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print {stopped, pid} as JSON.")] = False,
) -> None:
    """Stop the infrastructure started with `infra up --detach`."""

    def said(stopped: bool, pid: int | None, text: str) -> None:
        if as_json:
            _print_json({"stopped": stopped, "pid": pid})
        else:
            _out().print(text)

    pid_path = _run_dir() / "infra.pid"
    if not pid_path.exists():
        said(False, None, "nothing to stop (no detached infrastructure)")
        return
    pid = int(pid_path.read_text().strip())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_path.unlink(missing_ok=True)
        said(False, pid, f"already stopped (pid {pid})")
        return
    deadline = time.monotonic() + stop_timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)
    said(True, pid, f"stopped (pid {pid})")


def main() -> None:
    app()
