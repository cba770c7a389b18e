"""Wiring: configuration → one or many agent loops sharing an HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from agent.addresses import HostFacts, permitted_peers, read_resolv_conf
from agent.applier import AgentStats
from agent.client import (
    EnforcerClient,
    EnrollmentRefusedError,
    HttpRequester,
    PlainHttpRefusedError,
)
from agent.firewall import HostFirewall, NftablesFirewall, Probe, SimulatedFirewall
from agent.lighthttp import LightHttpClient
from agent.loop import (
    REENROLL_AFTER,
    AgentIdentity,
    AgentLoop,
    AgentStoppedError,
    EnrollmentKeySource,
    NoTrustedKeyError,
)
from agent.nft import check_table_name
from agent.state import StateStore
from agent.verification import PinnedKey, parse_trusted_keys
from shared.messages import FrozenPolicy
from shared.process import install_fast_event_loop, settle_heap

log = logging.getLogger(__name__)


class AgentConfigError(ValueError):
    """The agent's options do not make a usable configuration."""


ENROLLMENT_KEY_ENV = "HOSTISO_AGENT_ENROLLMENT_KEY"
SIGNING_KEY_ENV = "HOSTISO_AGENT_SIGNING_PUBLIC_KEY"


# A simulated fleet's process enrolls this many agents at a time. Thousands at once overflowed
# the enforcer (its bounded Redis pool answered 503 after 5 s, the agents' timeouts expired
# first, every retry enrolled another endpoint): issue 14's full bench never finished.
DEFAULT_ENROLL_CONCURRENCY = 50


def dev_mode_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``HOSTISO_DEV=1`` (as for the services) turns on the agent's dev mode too."""
    value = (os.environ if environ is None else environ).get("HOSTISO_DEV", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent is told on its command line and environment."""

    enforcer_url: str
    account_id: str
    state_dir: Path
    hostname: str
    platform: str = "linux"
    # On argv it is visible in `ps`: dev mode only. Else a root-only file or the environment.
    enrollment_key: str | None = None
    enrollment_key_file: Path | None = None
    enrollment_key_env: str | None = None
    facts: HostFacts = field(default_factory=HostFacts)
    table_name: str = "hostiso"
    # ``CURRENT[,NEXT]`` base64 Ed25519 keys; required outside dev mode.
    signing_public_key: str | None = None
    ca_file: Path | None = None
    dev: bool = False
    reenroll_after: int = REENROLL_AFTER
    backoff_cap: float = 30.0
    # The counters (alarms included) are logged this often while they change.
    stats_interval: float = 60.0
    simulated: bool = False
    count: int = 1
    poll_wait: float = 25.0
    platform_probe: Probe | None = None
    negative_probe: Probe | None = None
    table_check_interval: float = 30.0
    # Seconds between usage-counter reports while isolated (0: never).
    usage_interval: float = 60.0
    # Enrollment calls in flight at once among this process's agents (0: no bound). Only
    # matters with --count > 1: one agent has one enrollment in flight anyway.
    enroll_concurrency: int = DEFAULT_ENROLL_CONCURRENCY


def read_resolvers(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The ``nameserver`` addresses of resolv.conf a ruleset can allow (the rest logged)."""
    return read_resolv_conf(path)


def default_platform_probe(enforcer_url: str) -> Probe:
    """The enforcer itself: after isolating, the agent must still reach it."""
    parts = urlsplit(enforcer_url)
    if not parts.hostname:
        raise AgentConfigError(f"--enforcer-url {enforcer_url!r}: no host")
    return Probe(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


def check_key_file(path: Path, *, dev: bool) -> None:
    """The enrollment key file exists and, outside dev mode, only its owner may read it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise AgentConfigError(f"--enrollment-key-file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise AgentConfigError(f"--enrollment-key-file {path}: not a regular file")
    if not dev and mode & 0o077:
        raise AgentConfigError(
            f"--enrollment-key-file {path}: must not be accessible by group or other"
            f" (mode {stat.S_IMODE(mode):04o}; chmod 600) outside dev mode"
        )


def read_key_file(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"--enrollment-key-file {path}: unreadable ({exc})") from exc
    if not key:
        raise AgentConfigError(f"--enrollment-key-file {path}: empty")
    return key


def validate_config(config: AgentConfig) -> None:
    check_table_name(config.table_name)
    if config.signing_public_key is not None:
        parse_trusted_keys(config.signing_public_key)
    elif not config.dev:
        raise AgentConfigError(
            f"--signing-public-key (or {SIGNING_KEY_ENV}) is required outside dev mode: the"
            " agent never takes its key from the network"
        )
    if config.count < 1:
        raise AgentConfigError("--count must be at least 1")
    if config.enroll_concurrency < 0:
        raise AgentConfigError("--enroll-concurrency must be 0 (no bound) or more")
    if config.count > 1 and not config.simulated:
        raise AgentConfigError("--count > 1 needs --simulated (one host has one firewall)")
    if not 0 < config.backoff_cap <= 600:
        raise AgentConfigError("--backoff-cap must be in (0, 600] seconds")
    if config.reenroll_after < 1:
        raise AgentConfigError("--reenroll-after must be at least 1")
    sources = [
        name
        for name, value in (
            ("--enrollment-key", config.enrollment_key),
            ("--enrollment-key-file", config.enrollment_key_file),
            (ENROLLMENT_KEY_ENV, config.enrollment_key_env),
        )
        if value
    ]
    if not sources:
        raise AgentConfigError(
            f"give the enrollment key: --enrollment-key-file PATH (mode 0600) or {ENROLLMENT_KEY_ENV}"
        )
    if len(sources) > 1:
        raise AgentConfigError(f"give the enrollment key once, not by {' and '.join(sources)}")
    if config.enrollment_key and not config.dev:
        raise AgentConfigError(
            "--enrollment-key on the command line is visible to every user (ps) and refused"
            f" outside dev mode: use --enrollment-key-file or {ENROLLMENT_KEY_ENV}"
        )
    if config.enrollment_key_file is not None:
        check_key_file(config.enrollment_key_file, dev=config.dev)
        read_key_file(config.enrollment_key_file)
    scheme = urlsplit(config.enforcer_url).scheme
    if scheme not in ("http", "https"):
        raise AgentConfigError(f"--enforcer-url {config.enforcer_url!r}: must be https://")
    if scheme == "http" and not config.dev:
        raise AgentConfigError(
            f"--enforcer-url {config.enforcer_url!r}: plain http:// is refused outside dev mode"
            " (use https:// with --ca-file)"
        )
    if config.ca_file is not None:
        tls_context(config.ca_file)
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


def _enrollment_key_source(config: AgentConfig) -> EnrollmentKeySource:
    """The agent never holds the platform's JWT secret: the key is given, not fetched."""
    fixed = config.enrollment_key or config.enrollment_key_env
    key_file = config.enrollment_key_file

    async def given() -> str:
        if key_file is not None:
            # Read at each enrollment, so a rotated key only needs the file replaced.
            return await asyncio.to_thread(read_key_file, key_file)
        assert fixed is not None, "validate_config requires a key source"
        return fixed

    return given


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifies the enforcer's certificate and host name against ``ca_file`` (else the system CAs)."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise AgentConfigError(f"--ca-file {ca_file}: cannot load CA certificates ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


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
    http: HttpRequester,
    stats: AgentStats,
    agent_http: Callable[[], HttpRequester] | None = None,
) -> list[AgentLoop]:
    """The agents of ``config``; each gets its own client from ``agent_http`` (else ``http``)."""
    validate_config(config)
    keys: tuple[PinnedKey, ...] | None = (
        parse_trusted_keys(config.signing_public_key) if config.signing_public_key else None
    )
    gate = (
        asyncio.Semaphore(config.enroll_concurrency)
        if config.count > 1 and config.enroll_concurrency
        else None
    )
    loops = []
    for index in range(config.count):
        suffix = f"-{index}" if config.count > 1 else ""
        state_dir = config.state_dir / f"agent{suffix}" if config.count > 1 else config.state_dir
        client = EnforcerClient(
            config.enforcer_url,
            agent_http() if agent_http else http,
            allow_plain_http=config.dev,
            enrollment_gate=gate,
        )
        loops.append(
            AgentLoop(
                identity=AgentIdentity(
                    config.account_id, config.hostname + suffix, config.platform
                ),
                client=client,
                store=StateStore(state_dir, durable=not config.simulated),
                firewall=_firewall(config),
                enrollment_key=_enrollment_key_source(config),
                stats=stats,
                configured_key=keys,
                dev_mode=config.dev,
                poll_wait=config.poll_wait,
                table_check_interval=None if config.simulated else config.table_check_interval,
                usage_interval=None if config.simulated else config.usage_interval,
                reenroll_after=config.reenroll_after,
                backoff_cap=config.backoff_cap,
            )
        )
    return loops


async def _log_stats(stats: AgentStats, stop: asyncio.Event, interval: float) -> None:
    """The counters at INFO every ``interval`` while they change: alarms show up in the log
    (and whatever ships it) without waiting for the agent to stop."""
    last: dict[str, object] | None = None
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        now = dataclasses.asdict(stats)
        if now != last:
            log.info("agent stats", extra={"stats": now})
            last = now


def tune_fleet_process() -> None:
    """A process of thousands of simulated agents: the services' event loop (uvloop) and GC
    tuning (young collections every 20,000 allocations; what is alive at start frozen). The
    real agent keeps asyncio's own loop and the default GC (one agent, one connection)."""
    install_fast_event_loop()
    settle_heap()


async def run_agents(config: AgentConfig, stop: asyncio.Event | None = None) -> AgentStats:
    """Run every agent until ``stop`` (or SIGINT/SIGTERM); returns the counters."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    stats = AgentStats()
    tls = tls_context(config.ca_file)
    async with contextlib.AsyncExitStack() as clients:

        def agent_http() -> HttpRequester:
            if config.simulated:
                # Thousands per process: the light client (agent.lighthttp), not httpx.
                light = LightHttpClient(config.enforcer_url, tls)
                clients.push_async_callback(light.aclose)
                return light
            client = agent_http_client(tls)
            clients.push_async_callback(client.aclose)
            return client

        loops = build_loops(config, agent_http(), stats, agent_http)

        async def run_one(agent: AgentLoop) -> None:
            try:
                await agent.run(stop)
            except AgentStoppedError:
                return
            except (EnrollmentRefusedError, NoTrustedKeyError, PlainHttpRefusedError) as exc:
                log.error("enrollment refused: %s", exc, extra={"account_id": config.account_id})
                stop.set()
                raise

        reporter = asyncio.create_task(_log_stats(stats, stop, config.stats_interval))
        try:
            results = await asyncio.gather(*(run_one(a) for a in loops), return_exceptions=True)
        finally:
            reporter.cancel()
    log.info("agents stopped: %s", stats)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return stats
