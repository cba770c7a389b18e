"""Measure the isolation service: requests/s and request → enforcer-command latency (p50/p99).

``python -m services.isolation.measure --requests 1000`` starts a local Kafka and Redis (unless
``--bootstrap``/``--redis-url`` are given), runs the service as a process, and sends requests on
``isolation.requests.v1``. Each endpoint alternates isolate (standard, with an allowlist snapshot)
and release, so every request yields exactly one command. Latency is the command's Kafka
timestamp minus the request's (both CreateTime on this host's clock).

Two phases: a burst (all requests at once: throughput, latency including queueing) and a paced
run (``--rate`` requests/s: latency without a backlog).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.infra import LocalKafka, LocalRedis
from shared.infra.proc import free_port, spawn, stop
from shared.kafka import ensure_topics, make_producer, publish
from shared.messages import (
    Actor,
    AllowlistChanged,
    AllowlistEntry,
    EndpointRegistered,
    EnforcePolicy,
    IsolateEndpoint,
    ReleaseEndpoint,
)
from shared.topics import Topics

ACCOUNT = "acct-measure"

# The service under pyinstrument. uvicorn re-raises SIGTERM after its graceful shutdown; a
# handler turns that into SystemExit so the report is still written.
_PROFILED_SERVICE = """
import signal, sys
from pyinstrument import Profiler

def _exit(*_):
    raise SystemExit(0)

signal.signal(signal.SIGTERM, _exit)
profiler = Profiler(interval=0.002)
profiler.start()
try:
    from services.isolation.bootstrap import main
    main()
finally:
    profiler.stop()
    with open(sys.argv[1], "w") as out:
        out.write(profiler.output_text(unicode=False, color=False))
        out.write(profiler.output_text(flat=True, show_all=True))
        out.write(profiler.output_text(show_all=True))
"""
ACTOR = Actor(sub="measure", role="soc")


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CommandWatcher:
    """Reads the enforcer command topics and records each command's timestamp by request id."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._topics = topics
        self._bootstrap = bootstrap
        self.seen: dict[str, int] = {}

    async def start(self) -> None:
        await self._consumer.start()
        names = [self._topics.enforcer_commands, self._topics.enforcer_commands_priority]
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics(names)
        finally:
            await admin.close()
        tps = [
            TopicPartition(topic["topic"], part["partition"])
            for topic in described
            for part in topic["partitions"]
        ]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)

    async def wait(self, request_ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not request_ids <= self.seen.keys():
            if time.monotonic() > deadline:
                missing = len(request_ids - self.seen.keys())
                raise TimeoutError(f"{missing} commands missing after {timeout}s")
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    command = EnforcePolicy.model_validate_json(record.value)
                    self.seen.setdefault(command.request_id, record.timestamp)

    async def stop(self) -> None:
        await self._consumer.stop()


async def _prepare(producer: Any, topics: Topics, endpoints: int) -> None:
    now = datetime.now(UTC)
    await publish(
        producer,
        topics.settings_allowlist,
        ACCOUNT,
        AllowlistChanged(
            account_id=ACCOUNT,
            enabled=True,
            version=1,
            updated_at=now,
            changed_by=ACTOR,
            entries=(
                AllowlistEntry(
                    id="e1", name="RMM", address="203.0.113.10", created_at=now, created_by="m"
                ),
            ),
        ),
    )
    await asyncio.gather(
        *(
            publish(
                producer,
                topics.endpoints,
                f"m{i}",
                EndpointRegistered(
                    endpoint_id=f"m{i}",
                    account_id=ACCOUNT,
                    hostname=f"m{i}",
                    platform="linux",
                    enrolled_at=now,
                ),
            )
            for i in range(endpoints)
        )
    )


class RequestStream:
    """Isolate, release, isolate... per endpoint, round-robin over the endpoints."""

    def __init__(self, endpoints: int) -> None:
        self._endpoints = endpoints
        self._count = 0

    def next(self) -> IsolateEndpoint | ReleaseEndpoint:
        endpoint = f"m{self._count % self._endpoints}"
        isolate = (self._count // self._endpoints) % 2 == 0
        self._count += 1
        if isolate:
            return IsolateEndpoint(endpoint_id=endpoint, mode="standard", requested_by=ACTOR)
        return ReleaseEndpoint(endpoint_id=endpoint, requested_by=ACTOR)


async def _run_phase(
    producer: Any,
    topics: Topics,
    watcher: CommandWatcher,
    stream: RequestStream,
    count: int,
    rate: float | None,
) -> tuple[float, list[float]]:
    sent: dict[str, int] = {}
    futures = []
    started = time.monotonic()
    for n in range(count):
        request = stream.next()
        if rate is not None:
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        futures.append(
            (
                request.request_id,
                await producer.send(
                    topics.isolation_requests, request.to_bytes(), key=request.endpoint_id.encode()
                ),
            )
        )
    for request_id, future in futures:
        sent[request_id] = (await future).timestamp
    await watcher.wait(set(sent), timeout=max(120.0, count / 5))
    first = min(sent.values())
    last = max(watcher.seen[r] for r in sent)
    throughput = count / max((last - first) / 1000, 1e-3)
    latencies = [float(watcher.seen[r] - sent[r]) for r in sent]
    return throughput, latencies


async def _measure(
    bootstrap: str,
    redis_url: str,
    requests: int,
    endpoints: int,
    rate: float,
    log_dir: Path,
    profile: Path | None,
) -> None:
    prefix = f"m{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix)
    await ensure_topics(bootstrap, topics)
    producer = make_producer(bootstrap)
    await producer.start()
    port = free_port()
    env = dict(
        os.environ,
        HOSTISO_DEV="1",
        HOSTISO_KAFKA_BOOTSTRAP=bootstrap,
        HOSTISO_REDIS_URL=redis_url,
        HOSTISO_TOPIC_PREFIX=prefix,
        HOSTISO_REDIS_PREFIX=prefix.replace(".", ":"),
        HOSTISO_HTTP_PORT=str(port),
        HOSTISO_LOG_LEVEL="WARNING",
    )
    command = [sys.executable, "-m", "services.isolation"]
    if profile is not None:
        command = [sys.executable, "-c", _PROFILED_SERVICE, str(profile)]
    proc = spawn(command, log_path=log_dir / "isolation.log", env=env)
    watcher = CommandWatcher(bootstrap, topics)
    try:
        await _prepare(producer, topics, endpoints)
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"isolation service not ready; see {log_dir}")
                await asyncio.sleep(0.2)
        await watcher.start()
        stream = RequestStream(endpoints)
        await _run_phase(producer, topics, watcher, stream, min(50, requests), None)  # warm-up
        cpu_before = _cpu_seconds(proc.pid)
        burst_rate, burst_latency = await _run_phase(
            producer, topics, watcher, stream, requests, None
        )
        cpu_after = _cpu_seconds(proc.pid)
        paced_count = max(20, min(requests // 4, int(rate * 15)))
        _, paced_latency = await _run_phase(producer, topics, watcher, stream, paced_count, rate)
    finally:
        await watcher.stop()
        stop(proc)
        await producer.stop()
    typer.echo(f"burst: {requests} requests, {burst_rate:.0f} requests/s through the service")
    typer.echo(
        f"  latency request→command under the burst: p50 {statistics.median(burst_latency):.0f} ms,"
        f" p99 {_percentile(burst_latency, 99):.0f} ms"
    )
    if cpu_before is not None and cpu_after is not None:
        # CPU time per request is far less sensitive to a busy machine than requests/s.
        typer.echo(
            f"  service CPU under the burst: {(cpu_after - cpu_before) / requests * 1e6:.0f} µs"
            " per request"
        )
    typer.echo(
        f"paced: {paced_count} requests at {rate:.0f}/s: latency p50 "
        f"{statistics.median(paced_latency):.0f} ms, p99 {_percentile(paced_latency, 99):.0f} ms"
    )


def main(
    requests: Annotated[int, typer.Option(help="requests in the burst phase")] = 1000,
    endpoints: Annotated[int, typer.Option(help="distinct endpoints")] = 200,
    rate: Annotated[float, typer.Option(help="requests/s in the paced phase")] = 20.0,
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap (else a local one)")
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (else a local one)")] = None,
    profile: Annotated[
        Path | None, typer.Option(help="profile the service with pyinstrument into this file")
    ] = None,
) -> None:
    """Run the measurement and print requests/s and p50/p99 latency."""
    log_dir = Path(tempfile.mkdtemp(prefix="hostiso-measure-"))
    kafka = None if bootstrap else LocalKafka()
    redis = None if redis_url else LocalRedis()
    try:
        if kafka is not None:
            kafka.start()
            bootstrap = kafka.bootstrap
        if redis is not None:
            redis.start()
            redis_url = redis.url
        if bootstrap is None or redis_url is None:
            raise typer.BadParameter("no Kafka bootstrap or Redis URL")
        asyncio.run(_measure(bootstrap, redis_url, requests, endpoints, rate, log_dir, profile))
    finally:
        if redis is not None:
            redis.close()
        if kafka is not None:
            kafka.stop()


if __name__ == "__main__":
    typer.run(main)
