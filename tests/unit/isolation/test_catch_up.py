"""Read-your-writes catch-up: concurrent requests share an end-offset lookup only when it is fresh."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from services.isolation.adapters.lanes import FETCHED_AT
from services.isolation.adapters.replicas import CompactedTopicReplica, NewestCache
from shared.topics import TopicName, Topics


class GatedOffsets:
    """An end-offset lookup that answers what ``ends`` holds when it is released."""

    def __init__(self, ends: dict[int, int]) -> None:
        self.ends = ends
        self.started: list[float] = []
        self.release = asyncio.Event()

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.started.append(asyncio.get_running_loop().time())
        answer_at_start = dict(self.ends)
        await self.release.wait()
        return {tp: answer_at_start[tp.partition] for tp in tps}


def replica(offsets: GatedOffsets, positions: dict[int, int]) -> Any:
    async def apply(message: object, record: object) -> None:
        raise AssertionError("not used")

    r = CompactedTopicReplica(
        "unused:9092", Topics("t."), TopicName.SETTINGS_ALLOWLIST, apply, None
    )  # type: ignore[arg-type]
    r._offsets = offsets
    r._partitions = sorted(positions)
    r._positions = dict(positions)
    r._started.set()
    return r


async def advance(r: Any, positions: dict[int, int]) -> None:
    async with r._progress:
        r._positions = dict(positions)
        r._progress.notify_all()


async def test_requests_fetched_before_a_lookup_started_share_it() -> None:
    offsets = GatedOffsets({0: 5, 1: 5})
    r = replica(offsets, {0: 5, 1: 5})
    FETCHED_AT.set(asyncio.get_running_loop().time())
    callers = [asyncio.create_task(r.catch_up(f"acct-{i}", 5)) for i in range(50)]
    await asyncio.sleep(0.01)
    offsets.release.set()
    await asyncio.gather(*callers)
    assert len(offsets.started) == 1


async def test_a_lookup_that_started_before_the_request_was_fetched_is_not_reused() -> None:
    offsets = GatedOffsets({0: 5, 1: 5})
    r = replica(offsets, {0: 5, 1: 5})
    loop = asyncio.get_running_loop()
    FETCHED_AT.set(loop.time())
    early = asyncio.create_task(r.catch_up("acct-early", 5))
    await asyncio.sleep(0.01)
    assert len(offsets.started) == 1
    # A settings change is acknowledged while that lookup is in flight, then a request that
    # depends on it is fetched: the in-flight answer (5) may miss the change (now at 7).
    offsets.ends = {0: 7, 1: 7}
    await asyncio.sleep(0.001)
    FETCHED_AT.set(loop.time())
    late = [asyncio.create_task(r.catch_up(f"acct-{p}", 5)) for p in range(20)]
    await asyncio.sleep(0.01)
    offsets.release.set()
    await early
    await asyncio.sleep(0.01)
    # The late requests joined ONE new lookup, started after they were fetched.
    assert len(offsets.started) == 2
    assert offsets.started[1] >= FETCHED_AT.get()  # type: ignore[operator]
    assert not any(t.done() for t in late), "caught up before the replica reached offset 7"
    await advance(r, {0: 7, 1: 7})
    await asyncio.wait_for(asyncio.gather(*late), 5)


async def test_a_finished_fresh_lookup_answers_without_a_new_one() -> None:
    offsets = GatedOffsets({0: 3})
    offsets.release.set()
    r = replica(offsets, {0: 3})
    FETCHED_AT.set(asyncio.get_running_loop().time())
    await r.catch_up("acct-a", 5)
    await r.catch_up("acct-b", 5)
    assert len(offsets.started) == 1
    FETCHED_AT.set(asyncio.get_running_loop().time() + 0.001)
    await asyncio.sleep(0.002)
    await r.catch_up("acct-c", 5)
    assert len(offsets.started) == 2


def test_replica_cache_keeps_the_newest_version_and_stays_bounded() -> None:
    cache: NewestCache[str] = NewestCache(2)
    cache.offer("acct-a", "v2", 2)
    cache.offer("acct-a", "v1", 1)  # an older read from Redis never replaces a newer apply
    assert cache.get("acct-a") == "v2"
    cache.offer("acct-a", "v3", 3)
    assert cache.get("acct-a") == "v3"
    cache.offer("acct-b", "b", 1)
    cache.get("acct-a")  # recently used: acct-b is the oldest now
    cache.offer("acct-c", "c", 1)
    assert cache.get("acct-b") is None
    assert cache.get("acct-a") == "v3" and cache.get("acct-c") == "c"
