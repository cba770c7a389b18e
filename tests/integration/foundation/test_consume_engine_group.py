"""The shared consume loop on the real broker: rebalances under load, readiness as group member."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiokafka import ConsumerRecord

from shared.config import ServiceSettings
from shared.kafka import make_producer, publish
from shared.messages import Actor, IsolateEndpoint
from shared.runtime import Runtime
from shared.topics import TOPIC_SPECS, TopicName, Topics
from tests.helpers import SECURITY, kafka_admin_options, wait_for

SOC = Actor(sub="soc", role="soc")


def runtime_for(
    kafka_bootstrap: str,
    redis_url: str,
    topics: Topics,
    redis_prefix: str,
    instance: str,
    *,
    static: bool = False,
) -> Runtime:
    # A runtime of the harness, not of a product service: it connects as the admin principal.
    connection: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        **SECURITY.service_settings("admin", redis_url=redis_url),
    }
    settings = ServiceSettings(
        dev=True,
        **connection,
        topic_prefix=topics.prefix,
        redis_prefix=redis_prefix,
        instance_id=instance,
        kafka_static_membership=static,
        log_json=False,
    )
    return Runtime(settings, f"engine-{instance}")


@contextlib.asynccontextmanager
async def started(runtimes: list[Runtime]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for runtime in runtimes:
            await runtime.stop()


async def test_a_consumer_added_mid_stream_neither_crashes_the_group_nor_loses_records(
    kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> None:
    seen: Counter[str] = Counter()

    def handler_for(name: str) -> Callable[[Any, ConsumerRecord[bytes, bytes]], Any]:
        async def handle(message: IsolateEndpoint, record: ConsumerRecord[bytes, bytes]) -> None:
            # Slow enough that batches are in flight when the rebalance comes.
            await asyncio.sleep(0.002)
            seen[message.endpoint_id] += 1

        return handle

    group = topics.prefix + "engine-rebalance"
    runtimes = [
        runtime_for(kafka_bootstrap, redis_url, topics, redis_prefix, n) for n in ("a", "b")
    ]
    for runtime, name in zip(runtimes, ("a", "b"), strict=True):
        runtime.add_consumer(
            topics.isolation_requests,
            group_id=group,
            handler=handler_for(name),
            name="requests",
            max_records=50,
        )
    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    async with started(runtimes):
        try:
            first, second = runtimes
            await first.start()
            total = 600
            sends = [
                publish(
                    producer,
                    topics.isolation_requests,
                    f"ep-{i}",
                    IsolateEndpoint(endpoint_id=f"ep-{i}", mode="standard", requested_by=SOC),
                )
                for i in range(total)
            ]
            await asyncio.gather(*sends[: total // 2])
            await wait_for(lambda: len(seen) >= 50, timeout=60, message="first instance at work")
            # The second member joins while the first is mid-stream: a rebalance under load.
            await second.start(create_topics=False)
            await asyncio.gather(*sends[total // 2 :])
            await wait_for(lambda: len(seen) == total, timeout=90, message="every record handled")
            for runtime in runtimes:
                checks = await runtime.readiness()
                assert checks["consumer:requests"], checks
                assert all(e.restarts == 0 for e in runtime.supervisor.tasks.values())
            assert sum(loop.processed for r in runtimes for loop in r.consumers) >= total
            assert all(loop.processed > 0 for r in runtimes for loop in r.consumers), (
                "the second member never got a partition"
            )
        finally:
            await producer.stop()


async def test_more_instances_than_partitions_are_all_ready(
    kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> None:
    async def ignore(message: Any, record: ConsumerRecord[bytes, bytes]) -> None:
        return None

    group = topics.prefix + "engine-four"
    runtimes = [
        runtime_for(kafka_bootstrap, redis_url, topics, redis_prefix, f"i{n}") for n in range(4)
    ]
    for runtime in runtimes:
        # audit.v1 has 3 partitions: the 4th member owns none.
        runtime.add_consumer(topics.audit, group_id=group, handler=ignore, name="priority")
    async with started(runtimes):
        await runtimes[0].start()
        for runtime in runtimes[1:]:
            await runtime.start(create_topics=False)

        async def all_ready() -> bool:
            checks = [await r.readiness() for r in runtimes]
            return all(c["consumer:priority"] for c in checks)

        await wait_for(all_ready, timeout=90, interval=0.5, message="four members ready")

        def owners() -> list[int]:
            return sorted(len(loop.consumer.assignment()) for r in runtimes for loop in r.consumers)

        await wait_for(
            lambda: owners() == [0, 1, 1, 1], timeout=60, message="3 partitions, 4 members"
        )
        for runtime in runtimes:
            assert (await runtime.readiness())["consumer:priority"]


async def test_a_static_member_restarted_at_once_gets_its_partitions_back(
    kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> None:
    seen: list[str] = []

    async def handle(message: IsolateEndpoint, record: ConsumerRecord[bytes, bytes]) -> None:
        seen.append(message.endpoint_id)

    def static_runtime() -> Runtime:
        runtime = runtime_for(
            kafka_bootstrap, redis_url, topics, redis_prefix, "static-1", static=True
        )
        runtime.add_consumer(
            topics.isolation_requests_priority,
            group_id=topics.prefix + "engine-static",
            handler=handle,
            name="priority",
        )
        return runtime

    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    try:
        first = static_runtime()
        assert first.group_instance_id() == "static-1"
        async with started([first]):
            await first.start()
            await wait_for(lambda: first.consumers[0].member(), timeout=60, message="joined")
            request = IsolateEndpoint(endpoint_id="ep-s1", mode="strict", requested_by=SOC)
            await publish(producer, topics.isolation_requests_priority, "ep-s1", request)
            await wait_for(lambda: "ep-s1" in seen, timeout=30, message="handled by the first")
        # A static member does not leave the group on stop: the same id rejoins at once and
        # keeps every partition, without waiting for the session to time out.
        again = static_runtime()
        async with started([again]):
            await again.start(create_topics=False)
            request = IsolateEndpoint(endpoint_id="ep-s2", mode="strict", requested_by=SOC)
            await publish(producer, topics.isolation_requests_priority, "ep-s2", request)
            await wait_for(lambda: "ep-s2" in seen, timeout=30, message="handled after restart")
            partitions = next(
                s.partitions for s in TOPIC_SPECS if s.name == TopicName.ISOLATION_REQUESTS_PRIORITY
            )
            assert len(again.consumers[0].consumer.assignment()) == partitions
            assert seen.count("ep-s1") == 1  # committed before the stop: not handled twice
    finally:
        await producer.stop()
