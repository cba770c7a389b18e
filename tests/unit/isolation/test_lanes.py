"""The key-concurrent lane on an in-memory consumer: order per key, overlap across keys, commits."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from services.isolation.adapters.lanes import FETCHED_AT
from shared.consume import ConsumeLoop, KeyConcurrent, typed
from shared.messages import Actor, IsolateEndpoint
from shared.topics import TopicName, Topics

TOPICS = Topics("t.")
TOPIC = TOPICS(TopicName.ISOLATION_REQUESTS)
P0 = TopicPartition(TOPIC, 0)
P1 = TopicPartition(TOPIC, 1)
SOC = Actor(sub="soc", role="soc")


def record(tp: TopicPartition, offset: int, key: str) -> ConsumerRecord[bytes, bytes]:
    value = IsolateEndpoint(endpoint_id=key, mode="standard", requested_by=SOC).to_bytes()
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key.encode(),
        value=value,
        checksum=None,
        serialized_key_size=len(key),
        serialized_value_size=len(value),
        headers=(),
    )


class MemoryConsumer:
    """Hands out the given batches once each, then nothing; records commits and seeks."""

    def __init__(self, batches: list[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]):
        self._batches = list(batches)
        self.commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.drained = asyncio.Event()

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        if self._batches:
            return self._batches.pop(0)
        self.drained.set()
        await asyncio.sleep(0.01)
        return {}

    def assignment(self) -> set[TopicPartition]:
        return {P0, P1}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


class NoDeadLetters:
    async def send(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        raise AssertionError(f"unexpected dead letter: {reason}")


async def run_until_drained(lane: ConsumeLoop, consumer: MemoryConsumer) -> None:
    task = asyncio.create_task(lane.run())
    try:
        await asyncio.wait_for(consumer.drained.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def lane_with(consumer: MemoryConsumer, handler: Any, max_in_flight: int = 256) -> ConsumeLoop:
    return ConsumeLoop(
        consumer,
        KeyConcurrent(typed(TOPICS, handler), max_in_flight=max_in_flight),
        NoDeadLetters(),
        name="requests",
        max_records=1000,
    )


async def test_records_of_one_key_run_in_offset_order_and_other_keys_overlap() -> None:
    batch = {
        P0: [record(P0, o, key) for o, key in enumerate(["a", "b", "a", "b", "a"])],
        P1: [record(P1, 10, "c"), record(P1, 11, "c")],
    }
    consumer = MemoryConsumer([batch])
    running: set[str] = set()
    overlap: list[set[str]] = []
    seen: list[tuple[str, int]] = []

    async def handler(message: IsolateEndpoint, rec: ConsumerRecord[bytes, bytes]) -> None:
        key = message.endpoint_id
        assert key not in running, "two records of one key ran at once"
        running.add(key)
        overlap.append(set(running))
        await asyncio.sleep(0.01)
        seen.append((key, rec.offset))
        running.discard(key)

    await run_until_drained(lane_with(consumer, handler), consumer)
    for key in "abc":
        offsets = [o for k, o in seen if k == key]
        assert offsets == sorted(offsets), key
    assert max(len(keys) for keys in overlap) > 1, "different keys never ran concurrently"
    assert consumer.commits == [{P0: 5, P1: 12}]


async def test_a_failed_record_holds_back_its_key_and_the_commit_of_its_partition() -> None:
    batch = {
        P0: [record(P0, 0, "a"), record(P0, 1, "b"), record(P0, 2, "a"), record(P0, 3, "c")],
        P1: [record(P1, 0, "d")],
    }
    consumer = MemoryConsumer([batch])
    handled: list[tuple[str, int]] = []

    async def handler(message: IsolateEndpoint, rec: ConsumerRecord[bytes, bytes]) -> None:
        if (message.endpoint_id, rec.offset) == ("b", 1):
            raise ConnectionError("redis went away")
        handled.append((message.endpoint_id, rec.offset))

    lane = lane_with(consumer, handler)
    await run_until_drained(lane, consumer)
    # "a" and "c" may finish, but offset 1 did not: the partition commits up to it and is
    # rewound to it, so b@1 (and what follows) is fetched again; the other partition moves on.
    assert ("b", 1) not in handled
    assert consumer.commits == [{P0: 1, P1: 1}]
    assert consumer.seeks == [(P0, 1)]


async def test_a_failure_stops_the_rest_of_its_key_chain() -> None:
    batch = {P0: [record(P0, 0, "a"), record(P0, 1, "a"), record(P0, 2, "b")]}
    consumer = MemoryConsumer([batch])
    handled: list[int] = []

    async def handler(message: IsolateEndpoint, rec: ConsumerRecord[bytes, bytes]) -> None:
        if rec.offset == 0:
            raise TimeoutError("replica lag")
        handled.append(rec.offset)

    await run_until_drained(lane_with(consumer, handler), consumer)
    assert 1 not in handled  # a@1 must not overtake the failed a@0
    assert consumer.commits == []  # nothing before offset 0 to commit
    assert consumer.seeks == [(P0, 0)]


async def test_no_more_records_run_at_once_than_the_bound() -> None:
    batch = {P0: [record(P0, o, f"k{o}") for o in range(40)]}
    consumer = MemoryConsumer([batch])
    running = 0
    peak = 0

    async def handler(message: IsolateEndpoint, rec: ConsumerRecord[bytes, bytes]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1

    await run_until_drained(lane_with(consumer, handler, max_in_flight=8), consumer)
    assert peak == 8
    assert consumer.commits == [{P0: 40}]


async def test_handlers_see_when_their_batch_was_fetched() -> None:
    consumer = MemoryConsumer([{P0: [record(P0, 0, "a")]}])
    fetched: list[float | None] = []
    before = asyncio.get_running_loop().time()

    async def handler(message: IsolateEndpoint, rec: ConsumerRecord[bytes, bytes]) -> None:
        fetched.append(FETCHED_AT.get())

    await run_until_drained(lane_with(consumer, handler), consumer)
    (at,) = fetched
    assert at is not None and before <= at <= asyncio.get_running_loop().time()
