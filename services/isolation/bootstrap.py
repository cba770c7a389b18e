"""Wires the isolation service: Redis stores, replicas, request lanes, status consumer, REST API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from services.isolation.adapters.kafka_publisher import KafkaPublisher
from services.isolation.adapters.lanes import add_lane
from services.isolation.adapters.redis_batch import RedisBatcher
from services.isolation.adapters.redis_store import (
    RedisIsolationStore,
    RedisReplicaStore,
    RedisRevocationLog,
    RedisUsageStore,
)
from services.isolation.adapters.replicas import (
    CompactedTopicReplica,
    EndpointRegistry,
    ReplicaLagError,
    SettingsReplica,
)
from services.isolation.adapters.settings_client import (
    HttpSettingsClient,
    SettingsUnavailableError,
)
from services.isolation.api import add_error_handlers, build_inventory_router, build_router
from services.isolation.config import IsolationSettings
from services.isolation.consumers import IsolationConsumers
from services.isolation.handlers import IsolationService, SettingsClient
from services.isolation.inventory import InventoryService
from shared import tracing
from shared.auth import AUDIENCE_ISOLATION
from shared.http import (
    add_operational_routes,
    install_request_guards,
    serve,
    service_app,
    token_policy,
)
from shared.kafka import DeadLetterSink
from shared.logs import configure_logging
from shared.runtime import Runtime
from shared.topics import GroupName

SERVICE = "isolation"


def build_app(
    settings: IsolationSettings, *, settings_client: SettingsClient | None = None
) -> FastAPI:
    """The FastAPI app; connections open in its lifespan, never here."""
    runtime = Runtime(settings, SERVICE)
    jwt_secret = settings.require_secret("jwt_secret")
    # One batcher for every Redis command of the request path: concurrent handlers share pipelines.
    batcher = RedisBatcher(runtime.redis)
    replica_store = RedisReplicaStore(runtime.redis, runtime.keys, batcher)
    topics = runtime.topics

    def replica_dlq(name: GroupName) -> DeadLetterSink:
        group = topics.group(name)
        return DeadLetterSink(
            runtime.producer, runtime.topics, group, runtime.dlq_total.labels(group).inc
        )

    allowlists = SettingsReplica(
        replica_store,
        settings.kafka_bootstrap,
        runtime.topics,
        replica_dlq(GroupName.ISOLATION_SETTINGS_REPLICA),
        settings.catch_up_timeout_s,
        max_attempts=settings.consumer_max_attempts,
        kafka_options=runtime.kafka_options,
    )
    registry = EndpointRegistry(
        replica_store,
        settings.kafka_bootstrap,
        runtime.topics,
        replica_dlq(GroupName.ISOLATION_ENDPOINT_REGISTRY),
        settings.catch_up_timeout_s,
        max_attempts=settings.consumer_max_attempts,
        kafka_options=runtime.kafka_options,
    )
    isolation_store = RedisIsolationStore(
        runtime.redis, runtime.keys, batcher, outcome_ttl_s=settings.request_outcome_ttl_s
    )
    publisher = KafkaPublisher(runtime.producer, runtime.topics)
    service = IsolationService(
        store=isolation_store,
        settings=allowlists,
        registry=registry,
        publisher=publisher,
        settings_client=settings_client or HttpSettingsClient(settings.settings_url, jwt_secret),
        platform=tuple(settings.platform_addresses),
        revocations=RedisRevocationLog(runtime.redis, runtime.keys, batcher),
        usage=RedisUsageStore(runtime.redis, runtime.keys, batcher),
    )
    inventory = InventoryService(replica_store, isolation_store, registry, publisher)
    consumers = IsolationConsumers(service, runtime.registry)
    # One consumer group per lane: the priority lane has its own consumer and group, so strict
    # requests never queue behind a backlog of normal ones (guarantee 5). Instances of the
    # service share each group; per-endpoint order holds because requests are keyed by endpoint.
    # Replica lag and an unreachable settings service are outages, retried without limit.
    transient = (ReplicaLagError, SettingsUnavailableError)
    add_lane(
        runtime,
        topics.isolation_requests,
        group_id=topics.group(GroupName.ISOLATION_REQUESTS),
        handler=consumers.on_normal_request,
        name="requests",
        transient=transient,
    )
    add_lane(
        runtime,
        topics.isolation_requests_priority,
        group_id=topics.group(GroupName.ISOLATION_REQUESTS_PRIORITY),
        handler=consumers.on_priority_request,
        name="requests-priority",
        transient=transient,
    )
    add_lane(
        runtime,
        topics.isolation_status,
        group_id=topics.group(GroupName.ISOLATION_STATUS),
        handler=consumers.on_status,
        name="status",
        transient=transient,
    )
    # Revocations fan out from the allowlist events in a group of their own, keyed by account:
    # one instance fans each one out, and its offset is committed only after every per-endpoint
    # request is in Kafka (a crash re-fans it; the derived request ids absorb the repeat).
    add_lane(
        runtime,
        topics.settings_allowlist,
        group_id=topics.group(GroupName.ISOLATION_REVOCATIONS),
        handler=consumers.on_allowlist_changed,
        name="revocations",
        transient=transient,
    )
    replicas = (allowlists.replica, registry.replica)

    def stall_check(replica: CompactedTopicReplica) -> Callable[[], bool]:
        return lambda: replica.stalled(runtime.stall_after_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            for replica in replicas:
                await replica.start()
                # Supervised like the lanes: a crash restarts it from the positions it had
                # stored, and readiness is false while it is down or stalled.
                runtime.supervise(
                    f"replica:{replica.topic}", replica.run, stalled=stall_check(replica)
                )
            yield
        finally:
            # The supervised replica loops stop (with the runtime) before their consumers.
            await runtime.stop()
            for replica in replicas:
                await replica.stop()

    async def readiness() -> dict[str, bool]:
        checks = await runtime.readiness()
        for replica in replicas:
            try:
                checks[f"replica:{replica.topic}"] = await asyncio.wait_for(
                    replica.caught_up_all(), 2.0
                )
            except (TimeoutError, RuntimeError, AttributeError):
                checks[f"replica:{replica.topic}"] = False
        return checks

    app = service_app(
        title="hostiso isolation service",
        description="Endpoint isolation with frozen Tooling Allowlist snapshots (DESIGN.md §4).",
        lifespan=lifespan,
    )
    app.state.jwt_secret = jwt_secret
    app.state.runtime = runtime
    app.state.service = service
    app.state.replica_store = replica_store
    # Before CORS: the 401s and 413s carry the CORS headers the portal needs to read them.
    install_request_guards(
        app,
        token_policy=token_policy(settings, AUDIENCE_ISOLATION),
        max_body_bytes=settings.http_max_body_bytes,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
    )
    add_operational_routes(app, readiness, runtime.registry)
    # OpenTelemetry's FastAPI middleware when HOSTISO_OTEL_EXPORTER is set (no-op otherwise).
    tracing.instrument_app(app)
    add_error_handlers(app)
    app.include_router(build_router(service))
    app.include_router(build_inventory_router(inventory))
    return app


def main() -> None:
    settings = IsolationSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    app = build_app(settings)
    asyncio.run(serve(app, settings.http_host, settings.http_port, settings.log_level))
