"""Status reports arriving together reach the producer together; each waits for its own ack."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotEnoughReplicasError

from services.enforcer.adapters.kafka_publisher import KafkaEventPublisher, ReportBatcher
from shared.messages import PolicyStatusReported
from shared.topics import Topics
from tests.helpers import wait_for


def report(endpoint_id: str, sequence: int = 1) -> PolicyStatusReported:
    return PolicyStatusReported(
        endpoint_id=endpoint_id,
        account_id="acct-1",
        policy_id="pol-1",
        sequence=sequence,
        status="applied",
        rules_sha256="a" * 64,
    )


class FakeProducer:
    """Records which loop step each record was appended in; acks when told."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, int]] = []  # ..., the task that appended it
        self.acks: dict[bytes, asyncio.Future[Any]] = {}
        self.refuse: set[bytes] = set()

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
        if key in self.refuse:
            raise KafkaTimeoutError("no metadata")
        self.sent.append((topic, key, value, id(asyncio.current_task())))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks[key] = future
        return future

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, **_: Any) -> None:
        await (await self.send(topic, value, key))


async def _until(condition: Any) -> None:
    await wait_for(condition, timeout=5, interval=0.001)


async def test_reports_of_one_window_are_appended_in_one_step_and_acked_each() -> None:
    producer = FakeProducer()
    batcher = ReportBatcher(producer, window_s=0.05)
    calls = [
        asyncio.create_task(batcher.publish("status", f"ep-{i}", report(f"ep-{i}")))
        for i in range(3)
    ]
    await asyncio.sleep(0.01)
    late = asyncio.create_task(batcher.publish("status", "ep-3", report("ep-3")))
    await _until(lambda: len(producer.sent) == 4)
    assert len({task for *_, task in producer.sent}) == 1, "appended together, in one step"
    assert [key for _, key, _, _ in producer.sent] == [b"ep-0", b"ep-1", b"ep-2", b"ep-3"]
    assert PolicyStatusReported.model_validate_json(producer.sent[0][2]).endpoint_id == "ep-0"
    # Nobody is answered before its own record is acknowledged.
    await asyncio.sleep(0.01)
    assert not any(c.done() for c in [*calls, late])
    producer.acks[b"ep-1"].set_result("meta")
    await _until(calls[1].done)
    assert calls[1].result() is None
    assert not any(c.done() for c in (calls[0], calls[2], late))
    producer.acks[b"ep-0"].set_exception(NotEnoughReplicasError())
    producer.acks[b"ep-2"].set_result("meta")
    producer.acks[b"ep-3"].set_result("meta")
    with pytest.raises(NotEnoughReplicasError):
        await calls[0]
    await asyncio.gather(calls[2], late)


async def test_a_record_the_producer_refuses_fails_only_its_caller() -> None:
    producer = FakeProducer()
    producer.refuse.add(b"ep-bad")
    batcher = ReportBatcher(producer, window_s=0.001)
    bad = asyncio.create_task(batcher.publish("status", "ep-bad", report("ep-bad")))
    good = asyncio.create_task(batcher.publish("status", "ep-ok", report("ep-ok")))
    with pytest.raises(KafkaTimeoutError):
        await bad
    await _until(lambda: b"ep-ok" in producer.acks)
    producer.acks[b"ep-ok"].set_result("meta")
    await good


async def test_a_caller_that_gives_up_leaves_the_others_and_a_new_window_opens() -> None:
    producer = FakeProducer()
    batcher = ReportBatcher(producer, window_s=0.001)
    gone = asyncio.create_task(batcher.publish("status", "ep-a", report("ep-a")))
    kept = asyncio.create_task(batcher.publish("status", "ep-b", report("ep-b")))
    await _until(lambda: len(producer.sent) == 2)
    gone.cancel()
    producer.acks[b"ep-a"].set_result("meta")
    producer.acks[b"ep-b"].set_result("meta")
    await kept
    assert gone.cancelled()
    again = asyncio.create_task(batcher.publish("status", "ep-c", report("ep-c", 2)))
    await _until(lambda: len(producer.sent) == 3)
    producer.acks[b"ep-c"].set_result("meta")
    await again


async def test_the_publisher_sends_status_and_usage_reports_through_the_batcher() -> None:
    producer = FakeProducer()
    publisher = KafkaEventPublisher(producer, Topics("t."))
    call = asyncio.create_task(publisher.policy_status_reported(report("ep-1")))
    await _until(lambda: len(producer.sent) == 1)
    assert producer.sent[0][:2] == ("t.isolation.status.v1", b"ep-1")
    producer.acks[b"ep-1"].set_result("meta")
    await call
