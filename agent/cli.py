"""Command line of the reference agent (``python -m agent``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from agent.addresses import HostFacts, InvalidAddressError
from agent.bootstrap import (
    DEFAULT_ENROLL_CONCURRENCY,
    ENROLLMENT_KEY_ENV,
    SIGNING_KEY_ENV,
    AgentConfig,
    AgentConfigError,
    dev_mode_from_env,
    read_resolvers,
    run_agents,
    tune_fleet_process,
    validate_config,
)
from agent.client import EnrollmentRefusedError, PlainHttpRefusedError
from agent.firewall import Probe
from agent.loop import REENROLL_AFTER, NoTrustedKeyError
from agent.nft import InvalidTableNameError
from agent.state import StateCorruptError
from agent.verification import SigningKeyError
from shared.logs import configure_logging

app = typer.Typer(add_completion=False, help="Host isolation reference agent.")


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "hostiso-agent"


@app.command()
def main(
    enforcer_url: Annotated[
        str, typer.Option(help="Base URL of the enforcer's agent API (https://; http:// dev only).")
    ] = "https://127.0.0.1:8003",
    account_id: Annotated[str, typer.Option(help="Account this endpoint belongs to.")] = "",
    enrollment_key_file: Annotated[
        Path | None,
        typer.Option(
            help=f"File holding the enrollment key, mode 0600 (or env {ENROLLMENT_KEY_ENV})."
        ),
    ] = None,
    enrollment_key: Annotated[
        str | None,
        typer.Option(help="Dev only: the enrollment key on the command line (visible in ps)."),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="CA certificate(s) the enforcer's TLS certificate must chain to."),
    ] = None,
    dev: Annotated[
        bool,
        typer.Option(
            help="Dev mode (also HOSTISO_DEV=1): allows http://, --enrollment-key and pinning"
            " the signing key once at the first enrollment."
        ),
    ] = False,
    hostname: Annotated[str | None, typer.Option(help="Hostname to enroll as.")] = None,
    platform: Annotated[str, typer.Option(help="linux | windows | macos")] = "linux",
    state_dir: Annotated[
        Path | None, typer.Option(help="Where enrollment and the last policy live.")
    ] = None,
    platform_addresses: Annotated[
        str | None, typer.Option(help="Comma list of platform IPs that are always allowed.")
    ] = None,
    dns_resolvers: Annotated[
        str | None, typer.Option(help="Comma list of DNS resolvers (default: /etc/resolv.conf).")
    ] = None,
    table_name: Annotated[str, typer.Option(help="nftables table (family inet).")] = "hostiso",
    signing_public_key: Annotated[
        str | None,
        typer.Option(
            help="CURRENT[,NEXT] base64 Ed25519 keys policies must be signed with"
            f" (or env {SIGNING_KEY_ENV}); required outside dev mode."
        ),
    ] = None,
    signing_public_key_file: Annotated[
        Path | None, typer.Option(help="File holding CURRENT[,NEXT] signing public keys.")
    ] = None,
    reenroll_after: Annotated[
        int, typer.Option(help="Consecutive 401/403/404 answers before enrolling again.")
    ] = REENROLL_AFTER,
    backoff_cap: Annotated[
        float, typer.Option(help="Longest wait in seconds between retries after an error.")
    ] = 30.0,
    simulated: Annotated[
        bool, typer.Option(help="Verify and ack without touching nftables.")
    ] = False,
    count: Annotated[int, typer.Option(help="Simulated agents in this process.")] = 1,
    enroll_concurrency: Annotated[
        int,
        typer.Option(
            help="With --count > 1: enrollments in flight at once (0: no bound); the rest wait"
            " their turn instead of timing out in the enforcer's queue."
        ),
    ] = DEFAULT_ENROLL_CONCURRENCY,
    poll_wait: Annotated[float, typer.Option(help="Long-poll wait in seconds.")] = 25.0,
    platform_probe: Annotated[
        str | None,
        typer.Option(help="HOST:PORT that must answer after isolating (default: the enforcer)."),
    ] = None,
    negative_probe: Annotated[
        str | None, typer.Option(help="HOST:PORT that must NOT answer after isolating.")
    ] = None,
    table_check_interval: Annotated[
        float, typer.Option(help="Seconds between table checks.")
    ] = 30.0,
    usage_interval: Annotated[
        float,
        typer.Option(
            min=0, help="Seconds between allowlist usage reports while isolated (0: never)."
        ),
    ] = 60.0,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    log_json: Annotated[bool, typer.Option(help="JSON log lines.")] = True,
) -> None:
    """Enroll, long-poll for signed policies, enforce them, report back."""
    configure_logging("agent", log_level, log_json)
    # httpx logs every request at INFO: a line per long poll and per report drowns what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not account_id:
        raise typer.BadParameter("--account-id is required", param_hint="--account-id")
    try:
        if signing_public_key is None and signing_public_key_file is not None:
            try:
                signing_public_key = signing_public_key_file.read_text().strip()
            except OSError as exc:
                raise AgentConfigError(
                    f"--signing-public-key-file {signing_public_key_file}: {exc.strerror}"
                ) from exc
        config = AgentConfig(
            enforcer_url=enforcer_url,
            account_id=account_id,
            enrollment_key=enrollment_key,
            enrollment_key_file=enrollment_key_file,
            enrollment_key_env=os.environ.get(ENROLLMENT_KEY_ENV) or None,
            ca_file=ca_file,
            dev=dev or dev_mode_from_env(),
            reenroll_after=reenroll_after,
            backoff_cap=backoff_cap,
            hostname=hostname or socket.gethostname(),
            platform=platform,
            state_dir=state_dir or _default_state_dir(),
            facts=HostFacts(
                platform_addresses=_csv(platform_addresses),
                dns_resolvers=_csv(dns_resolvers)
                if dns_resolvers is not None
                else read_resolvers(),
            ),
            table_name=table_name,
            signing_public_key=signing_public_key or os.environ.get(SIGNING_KEY_ENV) or None,
            simulated=simulated,
            count=count,
            enroll_concurrency=enroll_concurrency,
            poll_wait=poll_wait,
            platform_probe=Probe.parse(platform_probe) if platform_probe else None,
            negative_probe=Probe.parse(negative_probe) if negative_probe else None,
            table_check_interval=table_check_interval,
            usage_interval=usage_interval,
        )
        validate_config(config)
    except (
        AgentConfigError,
        InvalidAddressError,
        InvalidTableNameError,
        SigningKeyError,
        OSError,
        ValueError,
    ) as exc:
        typer.echo(f"agent: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from exc
    if config.simulated:
        tune_fleet_process()
    try:
        asyncio.run(run_agents(config))
    except (
        EnrollmentRefusedError,
        NoTrustedKeyError,
        PlainHttpRefusedError,
        StateCorruptError,
    ) as exc:
        typer.echo(f"agent: {exc}", err=True)
        raise typer.Exit(1) from exc
