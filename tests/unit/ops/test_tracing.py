"""Trace context travels in Kafka headers; with no exporter nothing is traced or added."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import tracing
from shared.config import ConfigError
from shared.consume import ConsumeLoop, PerRecord, Work, typed
from shared.kafka import MessageRejected, publish
from shared.messages import EnforcePolicy, PolicyStatusReported
from shared.topics import Topics
from tests.samples import SAMPLES, sample_policy

TOPICS = Topics("hostiso.")


@dataclass
class Record:
    """The fields of an aiokafka ConsumerRecord the consume loop reads."""

    topic: str
    value: bytes
    key: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int = 0
    offset: int = 0


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []

    async def send_and_wait(self, topic: str, value: bytes, **kwargs: Any) -> None:
        self.sent.append((topic, value, kwargs))

    def record(self, index: int = -1) -> Record:
        topic, value, kwargs = self.sent[index]
        return Record(topic, value, kwargs["key"], list(kwargs.get("headers", [])))


class FakeDeadLetters:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def send(self, record: Any, reason: str) -> None:
        self.reasons.append(reason)


class OneRecord:
    """Runs one record through the consume loop's guarded, decoding handler."""

    def __init__(self, handler: Any, dlq: FakeDeadLetters) -> None:
        self._handler = typed(TOPICS, handler)
        self._loop = ConsumeLoop(None, PerRecord(self._handler), dlq, name="test")  # type: ignore[arg-type]

    async def _handle_one(self, record: Any) -> None:
        await Work(self._loop, {}).one(record, self._handler)


def consumer(handler: Any, dlq: FakeDeadLetters | None = None) -> OneRecord:
    return OneRecord(handler, dlq or FakeDeadLetters())


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure_tracing("test", span_exporter=exporter)
    yield exporter
    tracing.shutdown_tracing()


async def test_without_exporter_records_carry_no_trace_headers() -> None:
    assert not tracing.enabled()
    producer = FakeProducer()
    topic, key, message = SAMPLES[0]
    await publish(producer, TOPICS(topic), key, message)
    assert "headers" not in producer.sent[0][2]


def test_unknown_exporter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="HOSTISO_OTEL_EXPORTER"):
        tracing.configure_tracing("test", "jaeger")
    assert not tracing.configure_tracing("test", "none")
    assert not tracing.enabled()


async def test_consumed_message_is_handled_under_the_publishers_trace_id(
    spans: InMemorySpanExporter,
) -> None:
    producer = FakeProducer()
    topic, key, message = SAMPLES[2]
    tracer = trace.get_tracer("test", tracer_provider=tracing._provider)
    with tracer.start_as_current_span("POST /v1/endpoints/{endpoint_id}/isolation") as request:
        await publish(producer, TOPICS(topic), key, message)
    request_trace = request.get_span_context().trace_id

    seen: list[int] = []

    async def handler(msg: Any, record: Any) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    await consumer(handler)._handle_one(producer.record())  # type: ignore[arg-type]

    assert seen == [request_trace]
    by_name = {span.name: span for span in spans.get_finished_spans()}
    published = by_name["hostiso.isolation.requests.v1 publish"]
    processed = by_name["hostiso.isolation.requests.v1 process"]
    assert published.context.trace_id == processed.context.trace_id == request_trace
    assert processed.parent is not None
    assert processed.parent.span_id == published.context.span_id
    assert processed.attributes is not None
    assert processed.attributes["hostiso.endpoint_id"] == "ep-1"


async def test_rejected_message_span_is_marked_dead_lettered(
    spans: InMemorySpanExporter,
) -> None:
    producer = FakeProducer()
    topic, key, message = SAMPLES[2]
    await publish(producer, TOPICS(topic), key, message)

    async def refuse(msg: Any, record: Any) -> None:
        raise MessageRejected("unknown endpoint")

    dlq = FakeDeadLetters()
    await consumer(refuse, dlq)._handle_one(producer.record())  # type: ignore[arg-type]
    assert dlq.reasons == ["unknown endpoint"]
    processed = next(s for s in spans.get_finished_spans() if s.name.endswith("process"))
    assert processed.attributes is not None
    assert processed.attributes["hostiso.dead_lettered"] is True
    assert not processed.status.is_ok


async def test_agent_ack_joins_the_trace_of_the_command_it_acknowledges(
    spans: InMemorySpanExporter,
) -> None:
    producer = FakeProducer()
    command = EnforcePolicy(request_id="r-1", policy=sample_policy(sequence=7))
    tracer = trace.get_tracer("test", tracer_provider=tracing._provider)
    with tracer.start_as_current_span("isolate") as isolate:
        await publish(producer, TOPICS.enforcer_commands, "ep-1", command)
    # The report is published by the enforcer while it serves the agent's own HTTP request.
    report = PolicyStatusReported(
        endpoint_id="ep-1",
        account_id="acct-1",
        policy_id="pol-1",
        sequence=7,
        status="applied",
        rules_sha256="a" * 64,
    )
    with tracer.start_as_current_span("POST /v1/agents/{agent_id}/policy-status") as agent:
        await publish(producer, TOPICS.isolation_status, "ep-1", report)
    assert agent.get_span_context().trace_id != isolate.get_span_context().trace_id

    seen: list[int] = []

    async def handler(msg: Any, record: Any) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    await consumer(handler)._handle_one(producer.record())  # type: ignore[arg-type]
    assert seen == [isolate.get_span_context().trace_id]
    acknowledged = next(s for s in spans.get_finished_spans() if s.name.endswith("acknowledged"))
    assert [link.context.trace_id for link in acknowledged.links] == [
        agent.get_span_context().trace_id
    ]


async def test_batched_consumer_marks_each_record_in_its_trace(
    spans: InMemorySpanExporter,
) -> None:
    producer = FakeProducer()
    command = EnforcePolicy(request_id="r-2", policy=sample_policy(sequence=3))
    await publish(producer, TOPICS.enforcer_commands, "ep-1", command)
    record = producer.record()
    tracing.record_received(record, command)
    published, received = spans.get_finished_spans()
    assert received.name == "hostiso.enforcer.commands.v1 process"
    assert received.context.trace_id == published.context.trace_id
    assert received.attributes is not None
    assert received.attributes["hostiso.sequence"] == 3


def test_log_lines_carry_the_trace_id_while_tracing(spans: InMemorySpanExporter) -> None:
    import json
    import logging

    from shared.logs import JsonFormatter

    formatter = JsonFormatter("test")
    tracer = trace.get_tracer("test", tracer_provider=tracing._provider)
    with tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(logging.makeLogRecord({"msg": "inside"})))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    outside = json.loads(formatter.format(logging.makeLogRecord({"msg": "outside"})))
    assert "trace_id" not in outside
