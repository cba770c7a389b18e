"""Wiring: configuration → one or many agent loops sharing an HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from agent.addresses import HostFacts, permitted_peers
from agent.applier import AgentStats
from agent.client import EnforcerClient, EnforcerUnavailableError, EnrollmentRefusedError
from agent.firewall import HostFirewall, NftablesFirewall, Probe, SimulatedFirewall
from agent.loop import AgentIdentity, AgentLoop, AgentStoppedError, EnrollmentKeySource
from agent.nft import check_table_name
from agent.state import StateStore
from agent.verification import PinnedKey
from shared.messages import FrozenPolicy

log = logging.getLogger(__name__)


class AgentConfigError(ValueError):
    """The agent's options do not make a usable configuration."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent is told on its command line."""

    enforcer_url: str
    account_id: str
    state_dir: Path
    hostname: str
    platform: str = "linux"
    enrollment_key: str | None = None
    settings_url: str | None = None
    facts: HostFacts = field(default_factory=HostFacts)
    table_name: str = "hostiso"
    signing_public_key: str | None = None
    simulated: bool = False
    count: int = 1
    poll_wait: float = 25.0
    platform_probe: Probe | None = None
    negative_probe: Probe | None = None
    table_check_interval: float = 30.0


def read_resolvers(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The ``nameserver`` addresses of resolv.conf that are plain IP addresses."""
    found: list[str] = []
    try:
        text = path.read_text()
    except OSError as exc:
        log.warning("cannot read %s: %s; no DNS resolver allowed", path, exc.strerror)
        return ()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1])
            except ValueError:
                log.warning("ignoring nameserver %r in %s: not a plain IP address", parts[1], path)
                continue
            found.append(parts[1])
    return tuple(found)


def default_platform_probe(enforcer_url: str) -> Probe:
    """The enforcer itself: after isolating, the agent must still reach it."""
    parts = urlsplit(enforcer_url)
    if not parts.hostname:
        raise AgentConfigError(f"--enforcer-url {enforcer_url!r}: no host")
    return Probe(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


def validate_config(config: AgentConfig) -> None:
    check_table_name(config.table_name)
    if config.signing_public_key is not None:
        PinnedKey.from_base64(config.signing_public_key)
    if config.count < 1:
        raise AgentConfigError("--count must be at least 1")
    if config.count > 1 and not config.simulated:
        raise AgentConfigError("--count > 1 needs --simulated (one host has one firewall)")
    if not config.enrollment_key and not config.settings_url:
        raise AgentConfigError("give --enrollment-key (or --settings-url to fetch it, dev only)")
    # Renders nothing, but refuses bad host facts before the first policy arrives.
    probe_policy = FrozenPolicy.model_validate(
        {
            "policy_id": "config-check",
            "endpoint_id": "config-check",
            "account_id": config.account_id,
            "sequence": 1,
            "mode": "strict",
            "settings_version": 0,
            "issued_at": "2000-01-01T00:00:00Z",
            "issued_by": "agent",
        }
    )
    permitted_peers(probe_policy, config.facts)


def _firewall(config: AgentConfig) -> HostFirewall:
    if config.simulated:
        return SimulatedFirewall(config.facts, config.table_name)
    return NftablesFirewall(
        config.facts,
        config.table_name,
        platform_probe=config.platform_probe or default_platform_probe(config.enforcer_url),
        negative_probe=config.negative_probe,
    )


def _enrollment_key_source(config: AgentConfig, http: httpx.AsyncClient) -> EnrollmentKeySource:
    async def fixed() -> str:
        assert config.enrollment_key is not None
        return config.enrollment_key

    async def from_settings() -> str:
        # Dev convenience (`make run`): ask the settings service with a service token.
        from shared.auth import AUDIENCE_SETTINGS, SCOPE_ENROLLMENT_KEY_READ, mint_token
        from shared.config import ServiceSettings

        secret = ServiceSettings().require_secret("jwt_secret")
        token = mint_token(
            secret,
            sub="agent-bootstrap",
            role="service",
            ttl_s=300,
            audience=[AUDIENCE_SETTINGS],
            scopes=[SCOPE_ENROLLMENT_KEY_READ],
        )
        url = f"{config.settings_url}/v1/accounts/{config.account_id}/enrollment-key"
        try:
            response = await http.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        except httpx.HTTPError as exc:
            raise EnforcerUnavailableError(f"settings enrollment-key: {exc!r}") from exc
        if response.status_code != 200:
            raise EnforcerUnavailableError(f"settings enrollment-key: HTTP {response.status_code}")
        return str(response.json()["enrollment_key"])

    return fixed if config.enrollment_key else from_settings


# An agent has at most a poll and a report in flight; a spare slot covers a report racing a
# poll that is being torn down.
AGENT_POOL_LIMITS = httpx.Limits(
    max_connections=3, max_keepalive_connections=2, keepalive_expiry=60
)


def agent_http_client(tls: ssl.SSLContext) -> httpx.AsyncClient:
    """One agent's own connection pool.

    Simulated agents must not share a pool: httpcore walks every connection of a pool (and asks
    each idle socket whether it is readable) each time a request is queued or released, so one
    pool for N long-polling agents costs O(N) per request, which was 30 ms a policy at N=360.
    The TLS context is shared because building one per client loads the CA bundle each time.
    """
    return httpx.AsyncClient(verify=tls, limits=AGENT_POOL_LIMITS)


def build_loops(
    config: AgentConfig,
    http: httpx.AsyncClient,
    stats: AgentStats,
    agent_http: Callable[[], httpx.AsyncClient] | None = None,
) -> list[AgentLoop]:
    """The agents of ``config``; each gets its own client from ``agent_http`` (else ``http``)."""
    validate_config(config)
    key = PinnedKey.from_base64(config.signing_public_key) if config.signing_public_key else None
    loops = []
    for index in range(config.count):
        suffix = f"-{index}" if config.count > 1 else ""
        state_dir = config.state_dir / f"agent{suffix}" if config.count > 1 else config.state_dir
        client = EnforcerClient(config.enforcer_url, agent_http() if agent_http else http)
        loops.append(
            AgentLoop(
                identity=AgentIdentity(
                    config.account_id, config.hostname + suffix, config.platform
                ),
                client=client,
                store=StateStore(state_dir, durable=not config.simulated),
                firewall=_firewall(config),
                enrollment_key=_enrollment_key_source(config, http),
                stats=stats,
                configured_key=key,
                poll_wait=config.poll_wait,
                table_check_interval=None if config.simulated else config.table_check_interval,
            )
        )
    return loops


async def run_agents(config: AgentConfig, stop: asyncio.Event | None = None) -> AgentStats:
    """Run every agent until ``stop`` (or SIGINT/SIGTERM); returns the counters."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    stats = AgentStats()
    tls = ssl.create_default_context()
    async with contextlib.AsyncExitStack() as clients:

        def agent_http() -> httpx.AsyncClient:
            client = agent_http_client(tls)
            clients.push_async_callback(client.aclose)
            return client

        # The shared client only fetches enrollment keys from the settings service (dev).
        http = httpx.AsyncClient(verify=tls)
        clients.push_async_callback(http.aclose)
        loops = build_loops(config, http, stats, agent_http)

        async def run_one(agent: AgentLoop) -> None:
            try:
                await agent.run(stop)
            except AgentStoppedError:
                return
            except EnrollmentRefusedError as exc:
                log.error("enrollment refused: %s", exc, extra={"account_id": config.account_id})
                stop.set()
                raise

        results = await asyncio.gather(*(run_one(a) for a in loops), return_exceptions=True)
    log.info("agents stopped: %s", stats)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return stats
