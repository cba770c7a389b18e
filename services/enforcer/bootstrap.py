"""Wires the enforcer: Redis stores, wake-up hub, signer, the two command lanes and the agent API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from redis.asyncio import Redis

from services.enforcer import api, presence
from services.enforcer.adapters.kafka_publisher import KafkaEventPublisher
from services.enforcer.adapters.metrics import EnforcerMetrics
from services.enforcer.adapters.redis_store import (
    CLUSTER_TRANSIENT_ERRORS,
    EnforcerKeys,
    RedisAgentStore,
    RedisEnrollmentKeyStore,
    RedisEnrollmentRateLimiter,
    RedisPolicyStore,
    load_or_create_dev_signing_key,
)
from services.enforcer.adapters.wakeups import RedisPolicyWakeups
from services.enforcer.config import EnforcerSettings
from services.enforcer.consumers import PolicyCommands, PriorityGate, lane_strategy
from services.enforcer.domain import NORMAL_LANE, PRIORITY_LANE, Lane
from services.enforcer.handlers import EnforcerDeps
from services.enforcer.signing import (
    PolicySigner,
    SigningKeyError,
    generate_private_key_b64,
    parse_private_key,
)
from shared import tracing
from shared.config import ConfigError
from shared.consume import ConsumeLoop
from shared.http import add_operational_routes, serve, service_app
from shared.logs import configure_logging
from shared.redis import RedisClient, is_cluster_url, make_redis, make_redis_cluster
from shared.runtime import Runtime
from shared.topics import GroupName

log = logging.getLogger(__name__)


def configured_signer(settings: EnforcerSettings) -> PolicySigner | None:
    """The signer from HOSTISO_SIGNING_KEY; None in dev mode without one; else a ConfigError."""
    if settings.signing_key is None:
        if settings.dev:
            return None
        raise ConfigError(
            "HOSTISO_SIGNING_KEY is required outside dev mode (HOSTISO_DEV=1): set it to the "
            "base64 of a raw 32-byte Ed25519 private key"
        )
    try:
        return PolicySigner(parse_private_key(settings.signing_key.get_secret_value()))
    except SigningKeyError as exc:
        raise ConfigError(str(exc)) from exc


def _add_lane(
    runtime: Runtime,
    deps: EnforcerDeps,
    metrics: EnforcerMetrics,
    *,
    lane: Lane,
    topic: str,
    max_records: int,
    gate: PriorityGate,
) -> ConsumeLoop:
    settings = runtime.settings
    # One group per lane: each lane commits and lags on its own, so the priority lane's
    # position never depends on how far the normal lane got through its backlog.
    group = (
        GroupName.ENFORCER_COMMANDS_PRIORITY
        if lane == PRIORITY_LANE
        else GroupName.ENFORCER_COMMANDS
    )
    commands = PolicyCommands(runtime.topics, lane=lane, deps=deps, metrics=metrics)
    return runtime.add_loop(
        topic,
        group_id=runtime.topics.group(group),
        name=f"commands-{lane}",
        strategy=lane_strategy(commands, gate),
        max_records=max_records,
        client_id=f"hostiso-enforcer-{lane}-{settings.instance_id}",
        # A failover of a Redis Cluster master is retried like a lost connection, never
        # counted against the commands of the batch.
        transient=CLUSTER_TRANSIENT_ERRORS,
    )


def _cluster_url(url: str) -> str:
    """``url`` as a ``redis+cluster://`` URL (HOSTISO_REDIS_CLUSTER=1 with a plain URL)."""
    if is_cluster_url(url):
        return url
    scheme, sep, rest = url.partition("://")
    return f"{scheme}+cluster{sep}{rest}"


def build_app(settings: EnforcerSettings | None = None) -> FastAPI:
    """The enforcer app; refuses to build without the secrets it needs outside dev mode."""
    settings = settings or EnforcerSettings()
    # The enrollment-key routes take user JWTs, exactly as the settings routes do.
    jwt_secret = settings.require_secret("jwt_secret")
    # Only dev mode knows the derived dev key; elsewhere only issued keys open enrollment.
    dev_enrollment_secret = settings.require_secret("enrollment_secret") if settings.dev else None
    signer = configured_signer(settings)
    runtime = Runtime(settings, "enforcer")
    # A single Redis or a Redis Cluster (HOSTISO_REDIS_CLUSTER=1 or a redis+cluster:// URL):
    # every script touches one slot, and wake-ups are per bucket on the bucket's shard.
    cluster = settings.redis_cluster or is_cluster_url(settings.redis_url)
    store_redis: RedisClient = (
        make_redis_cluster(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            ca_file=settings.redis_ca_file,
        )
        if cluster
        else make_redis(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            pool_timeout_s=20,
            ca_file=settings.redis_ca_file,
        )
    )
    wakeups = RedisPolicyWakeups(
        _cluster_url(settings.redis_url) if cluster else settings.redis_url,
        EnforcerKeys(runtime.keys).wake_channels(),
        ca_file=settings.redis_ca_file,
    )
    policies = RedisPolicyStore(store_redis, runtime.keys)
    deps = EnforcerDeps(
        agents=RedisAgentStore(
            store_redis, runtime.keys, settings.enrollment_max_endpoints_per_account
        ),
        policies=policies,
        events=KafkaEventPublisher(runtime.producer, runtime.topics),
        wakeups=wakeups,
        enrollment_keys=RedisEnrollmentKeyStore(store_redis, runtime.keys),
        enrollment_rate=RedisEnrollmentRateLimiter(
            store_redis, runtime.keys, settings.enrollment_rate_per_minute
        ),
        dev_enrollment_secret=dev_enrollment_secret,
        signer_or_none=signer,
    )
    metrics = EnforcerMetrics(runtime.registry, lambda: wakeups.waiting_count)
    seen = presence.Presence(
        presence.RedisSeenGate(store_redis, runtime.keys),
        presence.RedisAgentRegistrations(store_redis, runtime.keys),
        deps.events.endpoint_registered,
        settings.last_seen_interval_s,
    )
    # The normal lane gives way while the priority lane holds a batch (same event loop).
    gate = PriorityGate()
    lanes = {
        PRIORITY_LANE: _add_lane(
            runtime,
            deps,
            metrics,
            lane=PRIORITY_LANE,
            topic=runtime.topics.enforcer_commands_priority,
            max_records=settings.priority_lane_batch,
            gate=gate,
        ),
        NORMAL_LANE: _add_lane(
            runtime,
            deps,
            metrics,
            lane=NORMAL_LANE,
            topic=runtime.topics.enforcer_commands,
            max_records=settings.normal_lane_batch,
            gate=gate,
        ),
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if deps.signer_or_none is None:
            # Before the lanes start: nothing is signed until every instance agrees on the key.
            encoded, created = await load_or_create_dev_signing_key(
                runtime.redis,
                runtime.keys("enforcer", "dev-signing-key"),
                generate_private_key_b64(),
            )
            deps.signer_or_none = PolicySigner(parse_private_key(encoded), dev_key=True)
            log.warning(
                "DEV SIGNING KEY IN USE (%s, key_id %s): policies are signed with a key kept in "
                "Redis; set HOSTISO_SIGNING_KEY for any real deployment",
                "generated now" if created else "shared by this deployment",
                deps.signer.key_id,
            )
        await wakeups.start()
        await runtime.start()
        # Supervised: a gauge refresher that crashes is restarted and shows on /ready.
        runtime.supervise(
            "delivery-gauges", lambda: metrics.refresh_forever(policies.delivery_counts)
        )
        try:
            yield
        finally:
            await seen.drain()
            await runtime.stop()
            await wakeups.stop()
            await store_redis.aclose()
            if isinstance(store_redis, Redis):
                # Its pool was handed in, so aclose() leaves the pool's connections open.
                await store_redis.connection_pool.disconnect()

    app = service_app(
        title="hostiso enforcer",
        description="Agent enrollment and delivery of signed frozen isolation policies.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.jwt_secret = jwt_secret
    app.state.deps = deps
    app.state.metrics = metrics
    app.state.runtime = runtime
    app.state.wakeups = wakeups
    app.state.lanes = lanes
    app.state.presence = seen

    async def readiness() -> dict[str, bool]:
        checks = await runtime.readiness()
        checks["policy-wakeups"] = wakeups.subscribed.is_set()
        return checks

    api.install_guards(app, settings)  # first: innermost of the middleware, see install_guards
    add_operational_routes(app, readiness, runtime.registry)
    # OpenTelemetry's FastAPI middleware when HOSTISO_OTEL_EXPORTER is set (no-op otherwise).
    tracing.instrument_app(app)
    api.install(app)
    return app


async def _serve(settings: EnforcerSettings) -> None:
    # Built inside the loop: the Kafka clients bind to the running loop when constructed.
    try:
        app = build_app(settings)
    except ConfigError as exc:
        log.critical("enforcer refuses to start: %s", exc)
        raise SystemExit(2) from exc
    await serve(
        app,
        settings.http_host,
        settings.http_port,
        settings.log_level,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        on_shutdown=lambda: _drain_long_polls(app),
    )


def _drain_long_polls(app: FastAPI) -> None:
    # The deps exist once the lifespan has started (a shutdown during start-up has none).
    deps = getattr(app.state, "deps", None)
    if deps is not None:
        deps.wakeups.drain()


def main() -> None:
    try:
        settings = EnforcerSettings()
    except ValueError as exc:
        raise SystemExit(f"enforcer refuses to start: {exc}") from exc
    configure_logging("enforcer", settings.log_level, settings.log_json)
    asyncio.run(_serve(settings))
