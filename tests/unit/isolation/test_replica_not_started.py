"""A request handled before its replica started waits for it as a transient lag, not a poison."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from services.isolation.adapters.replicas import CompactedTopicReplica, ReplicaLagError
from shared.topics import TopicName, Topics


class Offsets:
    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}


def unstarted_replica() -> Any:
    async def apply(message: object, record: object) -> None:
        raise AssertionError("not used")

    r = CompactedTopicReplica(
        "unused:9092", Topics("t."), TopicName.SETTINGS_ALLOWLIST, apply, None
    )  # type: ignore[arg-type]
    r._offsets = Offsets()
    return r


async def test_catch_up_before_start_is_a_replica_lag_not_a_crash() -> None:
    # Before the fix: ZeroDivisionError in the partitioner (no partitions yet), a non-transient
    # failure that dead-letters an accepted request after max_attempts.
    with pytest.raises(ReplicaLagError):
        await unstarted_replica().catch_up("acct-1", 0.05)


async def test_catch_up_waits_for_the_start_then_returns() -> None:
    r = unstarted_replica()
    waiting = asyncio.create_task(r.catch_up("acct-1", 5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    r._partitions = [0, 1]
    r._positions = {0: 0, 1: 0}
    r._started.set()
    await asyncio.wait_for(waiting, 5)
