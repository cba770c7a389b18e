"""OpenTelemetry tracing across HTTP and Kafka, off unless an exporter is configured.

``HOSTISO_OTEL_EXPORTER=otlp`` exports spans over OTLP/HTTP (protobuf) to the collector named by
the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, headers,
timeout: the exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables itself);
``console`` prints finished spans as JSON on stdout; tests use
``configure_tracing(..., span_exporter=InMemorySpanExporter())``. With no exporter, every hook
below is one boolean test: no span, no header, no SDK import (the zero-overhead path).

HTTP uses the standard instrumentations: ``instrument_app`` adds OpenTelemetry's FastAPI (ASGI)
middleware to a service's app (its SERVER span is the one ``server_span`` hands to the metrics
middleware), and outgoing ``httpx`` requests get CLIENT spans and a ``traceparent`` header.
Kafka keeps the hand-written propagation below: ``opentelemetry-instrumentation-aiokafka`` has no
release of the SDK's train (its newest, 0.66b1, pins ``opentelemetry-semantic-conventions==0.66b1``
while ``opentelemetry-sdk==1.45.2`` pins 0.66b2), and its consumer span ends when ``getmany``
returns, before the handler runs, so it could not carry the trace through the handler anyway.

The W3C trace context travels in Kafka record headers (``traceparent``/``tracestate``): the
publisher injects it, the consumer continues the trace around its handler, so one isolation is a
single trace from the REST request through the request lane to the enforcer command. An agent's
acknowledgement arrives on a new HTTP request; its status record is joined back to the trace of
the command with the same ``(endpoint_id, sequence)`` that this process published.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.config import ConfigError

log = logging.getLogger(__name__)

EXPORTER_ENV = "HOSTISO_OTEL_EXPORTER"
EXPORTERS = ("otlp", "console", "none")
# Probes and scrapes are not traced (every few seconds per instance, no information).
UNTRACED_PATHS = ("/health", "/ready", "/metrics")
_CORRELATION_LIMIT = 10_000

_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_provider: Any = None
# (endpoint_id, sequence) -> context of the command published for it, for joining acks back.
_commands: OrderedDict[tuple[str, int], otel_context.Context] = OrderedDict()


def enabled() -> bool:
    return _tracer is not None


def configure_tracing(
    service: str, exporter: str | None = None, *, span_exporter: Any = None
) -> bool:
    """Turn tracing on with the named exporter (or a given SDK ``SpanExporter``); False if off.

    Idempotent per process: the first service to configure tracing names the resource.
    """
    global _tracer, _provider
    if _tracer is not None:
        return True
    name = "custom"
    if span_exporter is None:
        name = (exporter or "none").strip().lower()
        if name not in EXPORTERS:
            raise ConfigError(
                f"{EXPORTER_ENV}={exporter!r} is not supported: use one of {', '.join(EXPORTERS)}"
            )
        if name == "none":
            return False
    # The SDK is imported only when tracing is on.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": f"hostiso-{service}"}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        # One JSON object per line on stdout, like the logs on stderr, for line-based shippers.
        console = ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
        provider.add_span_processor(BatchSpanProcessor(console))
    _provider = provider
    _tracer = provider.get_tracer("hostiso")
    # The instrumentations use the stable HTTP attribute names (http.request.method,
    # http.response.status_code, url.*), as the Kafka spans here do, unless told otherwise.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    log.info("tracing on", extra={"service": service, "exporter": name})
    return True


def configure_from_environment(service: str) -> bool:
    """``configure_tracing`` with ``HOSTISO_OTEL_EXPORTER`` (unset or ``none``: off)."""
    return configure_tracing(service, os.environ.get(EXPORTER_ENV))


def shutdown_tracing() -> None:
    """Flush and turn tracing off (tests; a process may configure it again afterwards)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    _commands.clear()
    if provider is not None:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().uninstrument()
        provider.shutdown()


def force_flush(timeout_ms: int = 5000) -> bool:
    """Export every finished span now (tests; shutdown does it too). True when all were sent."""
    return bool(_provider.force_flush(timeout_ms)) if _provider is not None else True


def instrument_app(app: Any) -> None:
    """Add OpenTelemetry's FastAPI (ASGI) middleware to ``app``; no-op while tracing is off.

    Call it right after building the app (it wraps the middleware stack, built at the first
    request). The probes and ``/metrics`` are not traced.
    """
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        excluded_urls=",".join(f"{path}$" for path in UNTRACED_PATHS),
        exclude_spans=["receive", "send"],
    )


def _tracer_or_fail() -> trace.Tracer:
    if _tracer is None:
        raise RuntimeError("tracing is not configured")
    return _tracer


# --- Kafka -------------------------------------------------------------------------------


def _correlation(message: Any) -> tuple[str, int] | None:
    policy = getattr(message, "policy", None)
    if policy is not None and hasattr(policy, "sequence"):
        return str(policy.endpoint_id), int(policy.sequence)
    endpoint_id, sequence = (
        getattr(message, "endpoint_id", None),
        getattr(message, "sequence", None),
    )
    if isinstance(endpoint_id, str) and isinstance(sequence, int):
        return endpoint_id, sequence
    return None


def _attributes(topic: str, key: str | None, message: Any) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {"messaging.system": "kafka", "messaging.destination.name": topic}
    if key is not None:
        attrs["messaging.kafka.message.key"] = key
    if message is not None:
        attrs["hostiso.message_type"] = type(message).__name__
        for field in ("account_id", "endpoint_id", "request_id", "sequence"):
            value = getattr(message, field, None)
            if isinstance(value, str | int):
                attrs[f"hostiso.{field}"] = value
        correlation = _correlation(message)
        if correlation is not None:
            attrs["hostiso.endpoint_id"], attrs["hostiso.sequence"] = correlation
    return attrs


@contextlib.contextmanager
def publish_span(topic: str, key: str, message: Any) -> Iterator[list[tuple[str, bytes]]]:
    """A PRODUCER span named after the topic; yields the Kafka headers carrying its context."""
    tracer = _tracer_or_fail()
    with tracer.start_as_current_span(
        f"{topic} publish", kind=SpanKind.PRODUCER, attributes=_attributes(topic, key, message)
    ):
        carrier: dict[str, str] = {}
        _propagator.inject(carrier)
        correlation = _correlation(message)
        # Only commands open a trace an ack can join; a report must not overwrite it.
        if correlation is not None and getattr(message, "policy", None) is not None:
            _commands[correlation] = otel_context.get_current()
            _commands.move_to_end(correlation)
            while len(_commands) > _CORRELATION_LIMIT:
                _commands.popitem(last=False)
        yield [(name, value.encode()) for name, value in carrier.items()]


def _headers_carrier(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    return {
        name: value.decode("latin-1")
        for name, value in headers or ()
        if name in ("traceparent", "tracestate") and value is not None
    }


@contextlib.contextmanager
def consume_span(record: Any) -> Iterator[Any]:
    """A CONSUMER span around a record's handling, continuing the trace of its headers."""
    tracer = _tracer_or_fail()
    parent = _propagator.extract(_headers_carrier(getattr(record, "headers", None)))
    with tracer.start_as_current_span(
        f"{record.topic} process",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            **_attributes(record.topic, _key(record), None),
            "messaging.kafka.partition": record.partition,
            "messaging.kafka.offset": record.offset,
        },
    ) as span:
        yield span


def _key(record: Any) -> str | None:
    key = getattr(record, "key", None)
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else None


@contextlib.contextmanager
def handling(span: Any, record: Any, message: Any) -> Iterator[None]:
    """Run a decoded message's handler: adds its ids to ``span`` and picks the trace it ends.

    A status report of a command this process published (same endpoint and sequence) ends that
    command's trace: the handler then runs in a child span of the command, linked to the
    report's own trace (the agent's HTTP request), so one isolation reads as one trace.
    """
    attributes = _attributes(record.topic, _key(record), message)
    span.set_attributes(attributes)
    correlation = _correlation(message)
    command = None
    if correlation is not None and getattr(message, "policy", None) is None:
        command = _commands.get(correlation)
    if command is None:
        yield
        return
    with _tracer_or_fail().start_as_current_span(
        f"{record.topic} acknowledged",
        context=command,
        kind=SpanKind.CONSUMER,
        links=[Link(span.get_span_context())],
        attributes=attributes,
    ):
        yield


def record_received(record: Any, message: Any) -> None:
    """A zero-length CONSUMER span for a record a batched consumer stored with others.

    Batched loops (the enforcer's command lanes) handle many records in one Redis pipeline; this
    marks each record's arrival in the trace its headers carry. No-op with tracing off.
    """
    if _tracer is None:
        return
    parent = _propagator.extract(_headers_carrier(getattr(record, "headers", None)))
    span = _tracer.start_span(
        f"{record.topic} process",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=_attributes(record.topic, _key(record), message),
    )
    span.end()


def current_ids() -> tuple[str, str] | None:
    """Hex trace and span ids of the current span, for log lines; None when not tracing."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def record_error(span: Any, exc: BaseException, *, dead_lettered: bool = False) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
    if dead_lettered:
        span.set_attribute("hostiso.dead_lettered", True)


# --- HTTP --------------------------------------------------------------------------------


@contextlib.contextmanager
def server_span(method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """The SERVER span of one HTTP request, continuing a ``traceparent`` the caller sent.

    In an app passed to ``instrument_app`` the instrumentation's span is already current and
    names itself (route template, status); it ends when the last body chunk is sent, so the
    caller gets a non-recording span to annotate. Otherwise a span is started here. Probes and
    ``/metrics`` are not traced.
    """
    tracer = _tracer_or_fail()
    current = trace.get_current_span()
    if path in UNTRACED_PATHS or (
        current.is_recording() and getattr(current, "kind", None) == SpanKind.SERVER
    ):
        yield trace.INVALID_SPAN
        return
    parent = _propagator.extract(dict(headers))
    with tracer.start_as_current_span(
        f"{method} {path}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": path},
    ) as span:
        yield span
