"""The chaos driver keeps resending while the broker restarts, even if the producer cannot start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

import bench.chaos as chaos
from bench.chaos import Chaos, ChaosSizes, Workload
from shared.topics import Topics


class RestartingBroker:
    """A stack whose broker is down for the first ``down`` sends and producer restarts."""

    def __init__(self, down: int) -> None:
        self.topics = Topics("t.")
        self.down = down
        self.sends = 0
        self.resets = 0

    async def send(self, topic: str, key: str, message: Any) -> asyncio.Future[None]:
        self.sends += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.sends <= self.down:
            future.set_exception(KafkaConnectionError("broker down"))
        else:
            future.set_result(None)
        return future

    async def reset_producer(self) -> None:
        self.resets += 1
        if self.sends <= self.down:
            # What AIOKafkaProducer.start() raises while the broker is down.
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]")


async def test_a_producer_reset_failing_while_the_broker_is_down_does_not_crash_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    stack = RestartingBroker(down=12)
    driver = Chaos(stack, ChaosSizes())  # type: ignore[arg-type]
    work = Workload()
    await driver.send_toggle("ep-1", work)
    assert stack.resets >= 2 and work.send_errors == 12
    assert work.last == {"ep-1": "standard"}


async def test_a_request_never_accepted_fails_after_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    monkeypatch.setattr(chaos, "SEND_DEADLINE_S", 0.0)
    driver = Chaos(RestartingBroker(down=10**9), ChaosSizes())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not accepted within"):
        await driver.send_toggle("ep-1", Workload())


_real_sleep = asyncio.sleep


async def _no_sleep(delay: float, result: Any = None) -> Any:
    await _real_sleep(0)
    return result
