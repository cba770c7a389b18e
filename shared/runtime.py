"""What a running service holds: one Kafka producer, one Redis client and its consumer loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from shared import tracing
from shared.config import ServiceSettings
from shared.http import add_operational_routes, with_timeout
from shared.kafka import (
    DeadLetterSink,
    Handler,
    TypedConsumer,
    ensure_topics,
    kafka_client_options,
    make_consumer,
    make_producer,
)
from shared.redis import Keys, make_redis
from shared.tasks import cancel_and_wait
from shared.topics import Topics

log = logging.getLogger(__name__)


class Runtime:
    """Connections and background consumers of one service process.

    Nothing connects in ``__init__``: ``start()`` does, from the lifespan of the FastAPI app.
    """

    def __init__(self, settings: ServiceSettings, service: str) -> None:
        self.settings = settings
        self.service = service
        # HOSTISO_OTEL_EXPORTER: tracing stays off (no SDK, no headers) unless it names one.
        tracing.configure_from_environment(service)
        self.topics = Topics(settings.topic_prefix)
        self.keys = Keys(settings.redis_prefix)
        self.registry = CollectorRegistry()
        self.redis = make_redis(settings.redis_url, ca_file=settings.redis_ca_file)
        self.kafka_options = kafka_client_options(settings)
        self.producer: Any = make_producer(
            settings.kafka_bootstrap, client_id=f"hostiso-{service}", options=self.kafka_options
        )
        self.consumers: list[TypedConsumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
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

    def add_consumer(
        self,
        *topic_names: str,
        group_id: str | None,
        handler: Handler,
        name: str,
        max_records: int = 500,
        auto_offset_reset: str = "earliest",
    ) -> TypedConsumer:
        consumer = make_consumer(
            self.settings.kafka_bootstrap,
            *topic_names,
            group_id=group_id,
            client_id=f"hostiso-{self.service}-{name}",
            auto_offset_reset=auto_offset_reset,
            options=self.kafka_options,
        )
        dlq = DeadLetterSink(
            self.producer, self.topics, group_id or name, self.dlq_total.labels(name).inc
        )
        typed = TypedConsumer(
            consumer, self.topics, handler, dlq, name=name, max_records=max_records
        )
        self.consumers.append(typed)
        return typed

    async def start(self, *, create_topics: bool = True) -> None:
        await _retry(self.redis.ping, "redis")
        if create_topics:
            await _retry(
                lambda: ensure_topics(
                    self.settings.kafka_bootstrap, self.topics, options=self.kafka_options
                ),
                "kafka topics",
            )
        await _retry(self.producer.start, "kafka producer")
        for typed in self.consumers:
            await _retry(typed.consumer.start, f"kafka consumer {typed.name}")
            self._tasks.append(asyncio.create_task(self._supervise(typed), name=typed.name))
        self._tasks.append(asyncio.create_task(self._report_lag(), name="lag"))
        self._started = True

    async def _supervise(self, typed: TypedConsumer) -> None:
        # A consumer loop that dies takes the process down: a supervisor restarts it cleanly.
        try:
            await typed.run()
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.critical("consumer %s crashed; stopping the service", typed.name, exc_info=True)
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
            raise

    async def _report_lag(self) -> None:
        while True:
            await asyncio.sleep(5)
            for typed in self.consumers:
                with contextlib.suppress(Exception):
                    lag = 0
                    for tp in typed.consumer.assignment():
                        hw = typed.consumer.highwater(tp)
                        pos = await typed.consumer.position(tp)
                        if hw is not None:
                            lag += max(0, hw - pos)
                    self.consumer_lag.labels(typed.name).set(lag)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for typed in self.consumers:
            with contextlib.suppress(Exception):
                await typed.consumer.stop()
        with contextlib.suppress(Exception):
            await self.producer.stop()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def readiness(self) -> dict[str, bool]:
        checks = {"redis": await with_timeout(self.redis.ping())}
        checks["kafka"] = self._started and await with_timeout(
            self.producer.client.fetch_all_metadata()
        )
        for typed in self.consumers:
            checks[f"consumer:{typed.name}"] = typed.assigned.is_set()
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

    def collect(self) -> Iterator[CounterMetricFamily]:
        consumed = CounterMetricFamily(
            "hostiso_consumer_records",
            "Records each consumer (lane) handled and committed past, DLQ'd ones included",
            labels=["consumer"],
        )
        for typed in self._runtime.consumers:
            consumed.add_metric([typed.name], float(typed.processed))
        yield consumed
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
