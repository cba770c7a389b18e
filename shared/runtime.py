"""What a running service holds: one Kafka producer, one Redis client and its consumer loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from shared import tracing
from shared.config import ConfigError, ServiceSettings
from shared.consume import ConsumeLoop, PerRecord, RebalanceListener, Strategy, typed
from shared.http import add_operational_routes, with_timeout
from shared.kafka import (
    DeadLetterSink,
    Handler,
    LazyClient,
    ensure_topics,
    kafka_client_options,
    make_consumer,
    make_producer,
)
from shared.process import settle_heap
from shared.redis import Keys, RedisClient, make_redis_client
from shared.tasks import Supervisor
from shared.topics import Topics

log = logging.getLogger(__name__)

STALL_AFTER_S = 120.0


class Runtime:
    """Connections and supervised background tasks of one service process.

    Nothing connects in ``__init__``: ``start()`` does, from the lifespan of the FastAPI app.
    Every consume loop and every other long-lived task (replicas, relay, gauge refreshers) runs
    under the runtime's ``Supervisor``: restarted with backoff when it crashes, and readiness
    is false while it is down, stalled, or (consumers) not a member of its group.
    """

    def __init__(self, settings: ServiceSettings, service: str) -> None:
        self.settings = settings
        self.service = service
        # HOSTISO_OTEL_EXPORTER: tracing stays off (no SDK, no headers) unless it names one.
        tracing.configure_from_environment(service)
        self.topics = Topics(settings.topic_prefix)
        self.keys = Keys(settings.redis_prefix)
        self.registry = CollectorRegistry()
        self.redis: RedisClient = make_redis_client(
            settings.redis_url, cluster=settings.redis_cluster, ca_file=settings.redis_ca_file
        )
        self.kafka_options = kafka_client_options(settings)
        self.producer: LazyClient = make_producer(
            settings.kafka_bootstrap, client_id=f"hostiso-{service}", options=self.kafka_options
        )
        self.consumers: list[ConsumeLoop] = []
        self.supervisor = Supervisor()
        self._pending: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], bool] | None]]
        self._pending = []
        self._started = False
        # A loop that has not come back from a fetch for this long is stalled (not ready).
        self.stall_after_s = STALL_AFTER_S
        self.dlq_total = Counter(
            "hostiso_dlq_records_total",
            "Records sent to the DLQ",
            ["consumer"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "hostiso_consumer_lag",
            "Records behind the end of the partitions",
            ["consumer"],
            registry=self.registry,
        )
        self.registry.register(_FlowCollector(self))

    def group_instance_id(self) -> str | None:
        """The static member id (HOSTISO_KAFKA_STATIC_MEMBERSHIP=1): HOSTISO_INSTANCE_ID."""
        return self.settings.instance_id if self.settings.kafka_static_membership else None

    def add_loop(
        self,
        *topic_names: str,
        group_id: str,
        name: str,
        strategy: Strategy,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        transient: tuple[type[BaseException], ...] = (),
        auto_offset_reset: str = "earliest",
        client_id: str | None = None,
    ) -> ConsumeLoop:
        """Register a consume loop (one consumer in ``group_id``), started and supervised here."""
        listener = RebalanceListener()
        consumer = make_consumer(
            self.settings.kafka_bootstrap,
            *topic_names,
            group_id=group_id,
            client_id=client_id or f"hostiso-{self.service}-{name}",
            auto_offset_reset=auto_offset_reset,
            group_instance_id=self.group_instance_id(),
            listener=listener,
            options=self.kafka_options,
        )
        dlq = DeadLetterSink(self.producer, self.topics, group_id, self.dlq_total.labels(name).inc)
        loop = ConsumeLoop(
            consumer,
            strategy,
            dlq,
            name=name,
            max_records=max_records,
            poll_timeout_ms=poll_timeout_ms,
            max_attempts=self.settings.consumer_max_attempts,
            transient=transient,
            listener=listener,
        )
        self.consumers.append(loop)
        return loop

    def add_consumer(
        self,
        *topic_names: str,
        group_id: str | None,
        handler: Handler,
        name: str,
        max_records: int = 500,
        auto_offset_reset: str = "earliest",
    ) -> ConsumeLoop:
        """A loop that decodes each record and hands it to ``handler``, in order per partition."""
        return self.add_loop(
            *topic_names,
            group_id=group_id or name,
            name=name,
            strategy=PerRecord(typed(self.topics, handler)),
            max_records=max_records,
            auto_offset_reset=auto_offset_reset,
        )

    def supervise(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        stalled: Callable[[], bool] | None = None,
    ) -> None:
        """Run ``factory()`` under the supervisor (now if started, else from ``start()``)."""
        if self._started:
            self.supervisor.spawn(name, factory, stalled=stalled)
        else:
            self._pending.append((name, factory, stalled))

    async def start(self, *, create_topics: bool = True) -> None:
        await _retry(self.redis.ping, "redis")
        if create_topics:
            await _retry(
                lambda: ensure_topics(
                    self.settings.kafka_bootstrap,
                    self.topics,
                    replication_factor=self.settings.topic_replication_factor,
                    min_insync_replicas=self.settings.topic_min_insync_replicas,
                    partitions=self.settings.topic_partition_counts,
                    options=self.kafka_options,
                ),
                "kafka topics",
            )
        await _retry(self.producer.start, "kafka producer")
        for loop in self.consumers:
            await _retry(loop.consumer.start, f"kafka consumer {loop.name}")
            self.supervisor.spawn(
                f"consumer:{loop.name}", loop.run, stalled=self._stalled_check(loop)
            )
        self.supervisor.spawn("lag", self._report_lag)
        self._started = True
        for name, factory, stalled in self._pending:
            self.supervisor.spawn(name, factory, stalled=stalled)
        self._pending.clear()
        settle_heap()

    def _stalled_check(self, loop: ConsumeLoop) -> Callable[[], bool]:
        return lambda: time.monotonic() - loop.last_poll > self.stall_after_s

    async def _report_lag(self) -> None:
        while True:
            await asyncio.sleep(5)
            for loop in self.consumers:
                with contextlib.suppress(Exception):
                    consumer: Any = loop.consumer
                    lag = 0
                    for tp in consumer.assignment():
                        hw = consumer.highwater(tp)
                        pos = await consumer.position(tp)
                        if hw is not None:
                            lag += max(0, hw - pos)
                    self.consumer_lag.labels(loop.name).set(lag)

    async def stop(self) -> None:
        await self.supervisor.stop()
        for loop in self.consumers:
            with contextlib.suppress(Exception):
                await loop.consumer.stop()
        with contextlib.suppress(Exception):
            await self.producer.stop()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def readiness(self) -> dict[str, bool]:
        checks = {"redis": await with_timeout(self.redis.ping())}
        checks["kafka"] = self._started and await with_timeout(
            self.producer.client.fetch_all_metadata()
        )
        healthy = self.supervisor.healthy()
        for loop in self.consumers:
            # A member of its group is ready even with no partition (more instances than
            # partitions); a loop that is down, stalled or not yet in its group is not.
            key = f"consumer:{loop.name}"
            checks[key] = healthy.get(key, False) and loop.member()
        for name, ok in healthy.items():
            checks.setdefault(f"task:{name}" if not name.startswith("consumer:") else name, ok)
        return checks

    def attach(self, app: FastAPI) -> None:
        """Serve /health, /ready and /metrics for this runtime."""
        add_operational_routes(app, self.readiness, self.registry)

    def lifespan(
        self, on_started: Callable[[], Any] | None = None
    ) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
        @contextlib.asynccontextmanager
        async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
            await self.start()
            if on_started is not None:
                result = on_started()
                if asyncio.iscoroutine(result):
                    await result
            try:
                yield
            finally:
                await self.stop()

        return _lifespan


class _FlowCollector(Collector):
    """Records consumed per consumer (lane) and acknowledged per topic, read at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        consumed = CounterMetricFamily(
            "hostiso_consumer_records",
            "Records each consumer (lane) handled and committed past, DLQ'd ones included",
            labels=["consumer"],
        )
        retries = CounterMetricFamily(
            "hostiso_consumer_retries",
            "Failed attempts that will be retried, by consumer and kind (transient: Kafka, "
            "Redis or HTTP connection trouble, retried without limit; error: counted against "
            "the record, dead-lettered after HOSTISO_CONSUMER_MAX_ATTEMPTS; commit)",
            labels=["consumer", "kind"],
        )
        dead = CounterMetricFamily(
            "hostiso_consumer_dead_letters",
            "Records each consumer sent to the DLQ",
            labels=["consumer"],
        )
        for loop in self._runtime.consumers:
            consumed.add_metric([loop.name], float(loop.processed))
            dead.add_metric([loop.name], float(loop.stats.dead_letters))
            for kind in ("transient", "error", "commit"):
                retries.add_metric([loop.name, kind], float(loop.stats.retries[kind]))
        yield consumed
        yield retries
        yield dead
        restarts = CounterMetricFamily(
            "hostiso_task_restarts",
            "Times the supervisor restarted a crashed (or returned) task",
            labels=["task"],
        )
        running = GaugeMetricFamily(
            "hostiso_task_running", "1 while a supervised task runs", labels=["task"]
        )
        for name, entry in sorted(self._runtime.supervisor.tasks.items()):
            restarts.add_metric([name], float(entry.restarts))
            running.add_metric([name], 1.0 if entry.running else 0.0)
        yield restarts
        yield running
        published = CounterMetricFamily(
            "hostiso_kafka_records_published",
            "Records this process's producer had acknowledged by Kafka (acks=all), by topic",
            labels=["topic"],
        )
        acked = getattr(self._runtime.producer, "records_acked", None) or {}
        prefix = self._runtime.topics.prefix
        for topic, count in sorted(acked.items()):
            name = topic[len(prefix) :] if topic.startswith(prefix) else topic
            published.add_metric([name], float(count))
        yield published


async def _retry(action: Callable[[], Any], what: str, attempts: int = 60) -> None:
    delay = 0.2
    for attempt in range(attempts):
        try:
            result = action()
            if asyncio.iscoroutine(result):
                await result
            return
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log.warning("waiting for %s: %r", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def single_node_redis(runtime: Runtime) -> Redis:
    """The runtime's client for a service whose keys are not yet laid out for Redis Cluster."""
    if isinstance(runtime.redis, Redis):
        return runtime.redis
    raise ConfigError(
        f"the {runtime.service} service does not run on Redis Cluster yet (its scripts span "
        "several hash slots): point HOSTISO_REDIS_URL at a single Redis (or a Sentinel-managed "
        "primary) and unset HOSTISO_REDIS_CLUSTER"
    )
