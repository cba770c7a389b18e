"""LazyClient: built on start(), and a producer that lost its idempotence state is replaced."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import OutOfOrderSequenceNumber

from shared.kafka import LazyClient


class FakeProducer:
    """Fails every send with OutOfOrderSequenceNumber when ``broken``, as aiokafka does."""

    instances: list[FakeProducer] = []

    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.stopped = False
        FakeProducer.instances.append(self)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True

    async def send_and_wait(self, topic: str, value: bytes, **_: Any) -> str:
        if self.broken:
            raise OutOfOrderSequenceNumber()
        return f"{topic}:{value.decode()}"

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[str]:
        # Completed later by the loop, as the broker's answer would be.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        if self.broken:
            loop.call_soon(future.set_exception, OutOfOrderSequenceNumber())
        else:
            loop.call_soon(future.set_result, f"{topic}:{value.decode()}")
        return future


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeProducer.instances.clear()


async def test_client_is_built_only_on_start() -> None:
    client = LazyClient(lambda: FakeProducer(broken=False), "producer")
    assert FakeProducer.instances == []
    with pytest.raises(RuntimeError, match="used before start"):
        client.flush  # noqa: B018 - attribute access is the behaviour under test
    await client.start()
    assert await client.send_and_wait("t", b"x") == "t:x"


async def test_concurrent_starts_build_and_start_one_client() -> None:
    started: list[FakeProducer] = []

    class SlowStart(FakeProducer):
        async def start(self) -> None:
            await asyncio.sleep(0.01)  # connecting: the other callers run meanwhile
            started.append(self)

    client = LazyClient(lambda: SlowStart(broken=False), "consumer")
    await asyncio.gather(*(client.start() for _ in range(16)))
    assert len(FakeProducer.instances) == 1
    assert len(started) == 1


async def test_producer_that_lost_its_sequence_state_is_replaced_for_the_next_send() -> None:
    builds = iter([True, False])
    client = LazyClient(lambda: FakeProducer(broken=next(builds)), "producer")
    await client.start()
    with pytest.raises(OutOfOrderSequenceNumber):
        await client.send_and_wait("t", b"first")
    assert await client.send_and_wait("t", b"retry") == "t:retry"
    first, second = FakeProducer.instances
    assert first.stopped and not second.stopped
    assert client.records_acked["t"] == 1


async def test_failed_future_from_send_also_triggers_the_rebuild() -> None:
    builds = iter([True, False])
    client = LazyClient(lambda: FakeProducer(broken=next(builds)), "producer")
    await client.start()
    future = await client.send("t", b"first")
    with pytest.raises(OutOfOrderSequenceNumber):
        await future
    assert await (await client.send("t", b"retry")) == "t:retry"
    assert len(FakeProducer.instances) == 2
