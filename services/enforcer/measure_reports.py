"""``python -m services.enforcer.measure_reports``: what status reports arriving together cost Kafka.

Reports arrive at ``--rate`` per second for ``--seconds`` (each its own task, as each is its own
agent request) and are published on ``isolation.status.v1`` with the services' producer
(acks=all, idempotent, 5 ms linger), once one by one (``shared.kafka.publish``, as before the
report batcher) and once through the enforcer's ``KafkaEventPublisher`` (``ReportBatcher``).
Prints produce requests per report (counted in aiokafka's sender), the broker's CPU per
report, this process's CPU per report and the latency to the acknowledgement. Kafka as in
``services.enforcer.measure`` (HOSTISO_KAFKA_BOOTSTRAP, or a local broker).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
import typer
from aiokafka.producer.sender import Sender

from services.enforcer.adapters.kafka_publisher import KafkaEventPublisher
from services.enforcer.measure import Stack, _kafka_cpu
from shared.kafka import ensure_topics, make_producer, publish
from shared.messages import PolicyStatusReported
from shared.topics import TopicName, Topics

_requests = [0]
_send_produce_req = Sender._send_produce_req


def _counted(self: Any, node_id: Any, batches: Any) -> Any:
    _requests[0] += 1
    return _send_produce_req(self, node_id, batches)


def _report(i: int) -> PolicyStatusReported:
    return PolicyStatusReported(
        endpoint_id=f"ep-{i}",
        account_id="acct-bench",
        policy_id="P",
        sequence=1,
        status="applied",
        rules_sha256="a" * 64,
    )


async def measure_reports(stack: Stack, rate: int, seconds: float, batched: bool) -> dict[str, Any]:
    topics = Topics(f"r{uuid.uuid4().hex[:8]}.")
    await ensure_topics(stack.bootstrap, topics, names=[TopicName.ISOLATION_STATUS])
    producer = make_producer(stack.bootstrap)
    await producer.start()
    try:
        send: Callable[[PolicyStatusReported], Awaitable[Any]]
        if batched:
            send = KafkaEventPublisher(producer, topics).policy_status_reported
        else:

            async def send(message: PolicyStatusReported) -> Any:
                return await publish(
                    producer, topics.isolation_status, message.endpoint_id, message
                )

        await asyncio.gather(*(send(_report(i)) for i in range(200)))  # warm-up
        latencies: list[float] = []

        async def one(i: int) -> None:
            sent = time.monotonic()
            await send(_report(i))
            latencies.append(time.monotonic() - sent)

        tasks: list[asyncio.Task[None]] = []
        _requests[0] = 0
        broker_before, client_before = _kafka_cpu(stack), time.process_time()
        started = time.monotonic()
        while (now := time.monotonic()) - started < seconds:
            while len(tasks) < int((now - started) * rate):
                tasks.append(asyncio.create_task(one(len(tasks))))
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
        broker, client = _kafka_cpu(stack) - broker_before, time.process_time() - client_before
    finally:
        await producer.stop()
    count = len(tasks)
    latencies.sort()
    return {
        "mode": "batched" if batched else "one by one",
        "reports": count,
        "produce_requests_per_report": round(_requests[0] / count, 3),
        "broker_cpu_ms_per_report": round(1000 * broker / count, 3),
        "client_cpu_ms_per_report": round(1000 * client / count, 3),
        "ack_ms_p50": round(1000 * latencies[count // 2], 1),
        "ack_ms_p99": round(1000 * latencies[int(count * 0.99)], 1),
    }


def main(
    rate: Annotated[int, typer.Option(help="reports per second")] = 1000,
    seconds: Annotated[float, typer.Option(help="seconds of reports per run")] = 4.0,
    pairs: Annotated[int, typer.Option(help="runs of each mode, interleaved")] = 2,
) -> None:
    """Print one JSON line per run."""
    Sender._send_produce_req = _counted

    async def run() -> None:
        with Stack() as stack:
            for _ in range(pairs):
                for batched in (False, True):
                    figure = await measure_reports(stack, rate, seconds, batched)
                    print(orjson.dumps({"reports": figure}).decode(), flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    typer.run(main)
