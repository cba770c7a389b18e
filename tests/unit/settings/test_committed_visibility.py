"""The relay marks a pass published only once read_committed readers can see its records."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from services.settings.adapters.outbox_relay import CommittedVisibility, NotVisibleError

TP = TopicPartition("hostiso.settings.allowlist.v1", 3)


class LaggingConsumer:
    """end_offsets() answers the LSO, which catches up only after a few asks (markers pending)."""

    def __init__(self, ends: list[int]) -> None:
        self.ends = ends
        self.asked = 0
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        value = self.ends[min(self.asked, len(self.ends) - 1)]
        self.asked += 1
        return dict.fromkeys(partitions, value)


async def test_waits_until_the_last_stable_offset_is_past_the_last_record_written() -> None:
    consumer = LaggingConsumer([41, 41, 42, 43])  # offset 42 written: visible once the LSO is 43
    await CommittedVisibility(consumer, timeout_s=5)({TP: 42})
    assert consumer.asked == 4


async def test_a_pass_that_never_becomes_visible_is_not_marked_published() -> None:
    consumer = LaggingConsumer([10])
    with pytest.raises(NotVisibleError):
        await CommittedVisibility(consumer, timeout_s=0.05)({TP: 42})


async def test_nothing_written_asks_nothing() -> None:
    consumer = LaggingConsumer([0])
    await CommittedVisibility(consumer)({})
    assert consumer.asked == 0 and not consumer.started
