"""On the real broker: a record published inside a span is handled under the same trace id."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from shared import tracing
from shared.config import ServiceSettings
from shared.messages import IsolateEndpoint
from shared.runtime import Runtime
from shared.topics import Topics
from tests.helpers import SECURITY, wait_for
from tests.samples import PARTNER


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure_tracing("test", span_exporter=exporter)
    yield exporter
    tracing.shutdown_tracing()


@pytest.fixture
async def runtime(
    kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> AsyncIterator[Runtime]:
    # Not a service of the product: the harness's own runtime connects as the admin principal.
    connection: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        **SECURITY.service_settings("admin", redis_url=redis_url),
    }
    settings = ServiceSettings(
        dev=True, topic_prefix=topics.prefix, redis_prefix=redis_prefix, **connection
    )
    rt = Runtime(settings, "tracing-test")
    yield rt
    await rt.stop()


async def test_record_is_consumed_under_the_trace_id_it_was_published_with(
    spans: InMemorySpanExporter, runtime: Runtime, topics: Topics
) -> None:
    handled: list[tuple[str, int]] = []

    async def handler(message: Any, record: Any) -> None:
        handled.append((message.endpoint_id, trace.get_current_span().get_span_context().trace_id))

    runtime.add_consumer(
        topics.isolation_requests,
        group_id=topics.prefix + "tracing",
        handler=handler,
        name="requests",
    )
    await runtime.start(create_topics=False)
    await wait_for(lambda: runtime.consumers[0].assigned.is_set(), message="assignment")

    from shared.kafka import publish

    tracer = trace.get_tracer("test", tracer_provider=tracing._provider)
    request = IsolateEndpoint(endpoint_id="ep-traced", mode="standard", requested_by=PARTNER)
    with tracer.start_as_current_span("POST /v1/endpoints/{endpoint_id}/isolation") as span:
        await publish(runtime.producer, topics.isolation_requests, "ep-traced", request)
    trace_id = span.get_span_context().trace_id

    await wait_for(lambda: handled, message="the record handled")
    assert handled == [("ep-traced", trace_id)]
    names = {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
    assert f"{topics.isolation_requests} publish" in names
    assert f"{topics.isolation_requests} process" in names

    # The same flow shows on /metrics: one record acknowledged, one consumed by the lane.
    text = generate_latest(runtime.registry).decode()
    assert 'hostiso_kafka_records_published_total{topic="isolation.requests.v1"} 1.0' in text
    assert 'hostiso_consumer_records_total{consumer="requests"} 1.0' in text
    with contextlib.suppress(asyncio.CancelledError):
        await runtime.stop()
