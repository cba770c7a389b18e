"""Wires the settings service: Runtime, Redis store, outbox relay, handlers and the REST API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from portal import PORTAL_PATH, mount_portal
from services.settings import api
from services.settings.adapters.audit import KafkaAuditSink
from services.settings.adapters.isolation_client import HttpRevocationCounter
from services.settings.adapters.outbox_relay import (
    CommittedVisibility,
    OutboxRelay,
    ProducerFactory,
    make_relay_producer,
    relay_transactional_id,
)
from services.settings.adapters.redis_store import RedisAllowlistStore
from services.settings.config import SettingsServiceSettings
from services.settings.domain import EntryLimits
from services.settings.handlers import RevocationCounter, SettingsHandlers
from services.settings.metrics import SettingsMetrics
from shared import tracing
from shared.auth import AUDIENCE_SETTINGS
from shared.http import (
    add_operational_routes,
    install_request_guards,
    serve,
    service_app,
    token_policy,
)
from shared.kafka import make_consumer
from shared.logs import configure_logging
from shared.runtime import Runtime

SERVICE = "settings"


def build_app(
    settings: SettingsServiceSettings, *, revocation_counter: RevocationCounter | None = None
) -> FastAPI:
    """The settings service app; connections open in its lifespan, not here."""
    runtime = Runtime(settings, SERVICE)
    metrics = SettingsMetrics(runtime.registry)
    # One layout for a single Redis and Redis Cluster: every script stays in one shard's slot.
    store = RedisAllowlistStore(
        runtime.redis,
        lambda *parts: runtime.keys(SERVICE, *parts),
        history_max_records=settings.history_max_records,
        shards=settings.settings_shards,
    )

    def shard_producer(shard: int) -> ProducerFactory:
        return make_relay_producer(
            settings.kafka_bootstrap,
            relay_transactional_id(runtime.topics, shard),
            client_id=f"hostiso-{SERVICE}-relay-{settings.instance_id}-{shard:02d}",
            options=runtime.kafka_options,
        )

    relay = OutboxRelay(
        store,
        shard_producer,
        runtime.topics,
        metrics,
        lease_ms=settings.relay_lease_ms,
        batch=settings.relay_batch,
        idle_s=settings.relay_idle_s,
        instance_id=settings.instance_id,
        max_shards=settings.relay_max_shards,
        # A write answers 2xx only once read_committed readers (the isolation service's
        # read-your-writes catch-up) can see its event.
        visibility=CommittedVisibility(
            make_consumer(
                settings.kafka_bootstrap,
                group_id=None,
                client_id=f"hostiso-{SERVICE}-relay-lso-{settings.instance_id}",
                options=runtime.kafka_options,
            )
        ),
    )
    handlers = SettingsHandlers(
        store=store,
        publication=relay,
        audit=KafkaAuditSink(runtime.producer, runtime.topics, metrics, settings.audit_timeout_s),
        max_entries=settings.allowlist_max_entries,
        publish_wait_s=settings.publish_wait_s,
        entry_limits=EntryLimits(
            max_prefix_v4=settings.allowlist_max_prefix_v4,
            max_prefix_v6=settings.allowlist_max_prefix_v6,
        ),
        revocation_counter=revocation_counter
        or HttpRevocationCounter(
            settings.isolation_url,
            settings.require_secret("jwt_secret"),
            timeout=settings.revoke_count_timeout_s,
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        await relay.start()
        try:
            yield
        finally:
            # The relay stops before the producer it publishes with.
            await relay.stop()
            await runtime.stop()

    app = service_app(
        title="hostiso settings service",
        description="Tooling Allowlist per account (DESIGN.md §4): the source of truth and the "
        "only writer of settings.allowlist.v1. A 2xx write means its AllowlistChanged event "
        "is in Kafka.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.jwt_secret = settings.require_secret("jwt_secret")
    app.state.handlers = handlers
    app.state.relay = relay
    app.state.store = store
    app.state.runtime = runtime
    app.state.settings = settings
    install_request_guards(
        app,
        token_policy=token_policy(settings, AUDIENCE_SETTINGS),
        public_paths=[PORTAL_PATH],
        public_prefixes=[f"{PORTAL_PATH}/"],
        max_body_bytes=settings.http_max_body_bytes,
    )

    async def readiness() -> dict[str, bool]:
        checks = await runtime.readiness()
        # The relay's loops catch their own errors; a relay any of whose tasks (the lease task,
        # a shard loop) ended is not ready.
        checks["task:relay"] = relay.running
        return checks

    add_operational_routes(app, readiness, runtime.registry)
    # OpenTelemetry's FastAPI middleware when HOSTISO_OTEL_EXPORTER is set (no-op otherwise).
    tracing.instrument_app(app)
    api.install(app, metrics)
    mount_portal(app, isolation_url=settings.isolation_public_url)
    return app


def main() -> None:
    settings = SettingsServiceSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    asyncio.run(_serve(settings))


async def _serve(settings: SettingsServiceSettings) -> None:
    # The Kafka client binds to the running loop, so the app is built inside it.
    app = build_app(settings)
    await serve(app, settings.http_host, settings.http_port, settings.log_level)
