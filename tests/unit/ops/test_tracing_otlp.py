"""HOSTISO_OTEL_EXPORTER=otlp: a service's spans arrive at an OTLP/HTTP receiver (protobuf POSTs).

The receiver is a local HTTP server that records what the exporter posts to ``/v1/traces``; the
exporter finds it through the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from shared import tracing
from tests.dockerbuild import ROOT
from tools.docs import APP_FACTORIES


class Receiver:
    """Records every OTLP export request and the ``traceparent`` of every other request."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        self.traceparents: list[str | None] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.paths.append(self.path)
                    if self.headers.get("Content-Type") == "application/x-protobuf":
                        receiver.exports.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(b"")

            def do_GET(self) -> None:
                with receiver.lock:
                    receiver.traceparents.append(self.headers.get("traceparent"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[tuple[str, Span]]:
        """(service.name, span) of every span received so far."""
        with self.lock:
            found = []
            for export in self.exports:
                for resource_spans in export.resource_spans:
                    attrs = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope in resource_spans.scope_spans:
                        found.extend((attrs.get("service.name", ""), s) for s in scope.spans)
            return found


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("HOSTISO_OTEL_EXPORTER", "otlp")
    try:
        yield receiver
    finally:
        tracing.shutdown_tracing()
        receiver.server.shutdown()
        receiver.server.server_close()


def _wait_for_spans(receiver: Receiver, trace_id: bytes, kinds: set[int]) -> list[Span]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tracing.force_flush()
        spans = [s for _, s in receiver.spans() if s.trace_id == trace_id]
        if kinds <= {s.kind for s in spans}:
            return spans
        time.sleep(0.05)
    raise AssertionError(f"no spans of kinds {kinds} for the trace arrived: {receiver.spans()}")


async def test_otlp_exporter_sends_the_spans_of_one_request_to_the_collector(
    receiver: Receiver,
) -> None:
    assert tracing.configure_from_environment("settings")
    app = APP_FACTORIES["settings"]()
    trace_hex, parent_hex = secrets.token_hex(16), secrets.token_hex(8)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(
            "/v1/accounts/acct-1/tooling-allowlist",
            headers={"traceparent": f"00-{trace_hex}-{parent_hex}-01"},
        )
        # Probes are not traced.
        assert (await client.get("/health")).status_code == 200
    assert response.status_code == 401

    spans = _wait_for_spans(receiver, bytes.fromhex(trace_hex), {Span.SPAN_KIND_SERVER})
    server = next(s for s in spans if s.kind == Span.SPAN_KIND_SERVER)
    assert server.parent_span_id == bytes.fromhex(parent_hex)
    assert server.name == "GET /v1/accounts/{account_id}/tooling-allowlist"
    attributes = {a.key: a.value for a in server.attributes}
    assert attributes["http.response.status_code"].int_value == 401
    assert ("hostiso-settings", server) in receiver.spans()
    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    assert not any("/health" in s.name for _, s in receiver.spans())


async def test_outgoing_httpx_requests_carry_the_trace_and_are_exported(
    receiver: Receiver,
) -> None:
    assert tracing.configure_from_environment("isolation")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{receiver.url}/settings-call")).status_code == 204
    traceparent = receiver.traceparents[-1]
    assert traceparent is not None, "the httpx instrumentation sent no traceparent"
    trace_id = bytes.fromhex(traceparent.split("-")[1])
    spans = _wait_for_spans(receiver, trace_id, {Span.SPAN_KIND_CLIENT})
    assert [s.kind for s in spans] == [Span.SPAN_KIND_CLIENT]


def test_with_tracing_off_the_services_import_neither_the_sdk_nor_instrumentations() -> None:
    # (redis-py imports opentelemetry.sdk.metrics for its own optional metrics: not ours.)
    script = (
        "import sys\n"
        "from tools.docs import APP_FACTORIES\n"
        "for factory in APP_FACTORIES.values():\n"
        "    factory()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(("
        "'opentelemetry.sdk.trace', 'opentelemetry.instrumentation', 'opentelemetry.exporter')))\n"
        "print(loaded)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTISO_", "OTEL_"))}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**env, "HOSTISO_DEV": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"
