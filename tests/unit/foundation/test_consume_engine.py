"""The shared consume loop on an in-memory log: rebalances, commit failures, poison, transients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis.exceptions
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, RebalanceInProgressError

from shared.consume import (
    Batched,
    ConsumeLoop,
    KeyConcurrent,
    PerRecord,
    Strategy,
)
from shared.kafka import DLQ_MAX_BYTES, bounded_dead_letter
from shared.tasks import Supervisor
from tests.helpers import wait_for

TOPIC = "t.isolation.requests.v1"
P0 = TopicPartition(TOPIC, 0)
P1 = TopicPartition(TOPIC, 1)

Record = ConsumerRecord[bytes, bytes]


def record(tp: TopicPartition, offset: int, key: str, value: bytes = b"{}") -> Record:
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


class LogConsumer:
    """A consumer over an in-memory log: fetches from its positions, honours seeks and commits.

    ``commit_error`` / ``seek_error`` make the next commit or seek raise what a consumer raises
    after its partitions were revoked.
    """

    def __init__(self, log: dict[TopicPartition, list[Record]], max_records: int = 100) -> None:
        self.log = log
        self.positions = {tp: 0 for tp in log}
        self.committed: dict[TopicPartition, int] = {}
        self.commit_calls = 0
        self.fetches = 0
        self.owned = set(log)
        self.commit_error: BaseException | None = None
        self.seek_error: BaseException | None = None
        self._max = max_records

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        await asyncio.sleep(0.001)
        self.fetches += 1
        batch: dict[TopicPartition, list[Record]] = {}
        for tp in sorted(self.owned, key=lambda t: t.partition):
            records = self.log[tp][self.positions[tp] : self.positions[tp] + self._max]
            if records:
                batch[tp] = records
                self.positions[tp] = records[-1].offset + 1
        return batch

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        self.commit_calls += 1
        if self.commit_error is not None:
            error, self.commit_error = self.commit_error, None
            raise error
        for tp, offset in (offsets or {}).items():
            if tp not in self.owned:
                raise IllegalStateError(f"Partition {tp} is not assigned")
            self.committed[tp] = offset

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if self.seek_error is not None:
            error, self.seek_error = self.seek_error, None
            raise error
        if partition not in self.owned:
            raise IllegalStateError(f"Partition {partition} is not assigned")
        self.positions[partition] = offset

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def drained(self) -> bool:
        return all(self.committed.get(tp, 0) == len(self.log[tp]) for tp in self.owned)


class Letters:
    def __init__(self) -> None:
        self.sent: list[tuple[Record, str]] = []

    async def send(self, record: Record, reason: str) -> None:
        self.sent.append((record, reason))


async def run_until(
    loop: ConsumeLoop, condition: Callable[[], bool], timeout: float = 10.0
) -> None:
    task = asyncio.create_task(loop.run())
    try:

        def met_or_crashed() -> bool:
            if task.done():
                task.result()  # a crash fails the test with its own traceback
                raise AssertionError("the loop ended")
            return condition()

        await wait_for(met_or_crashed, timeout=timeout, interval=0.005)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def make_loop(
    consumer: LogConsumer, strategy: Strategy, letters: Letters, max_attempts: int = 3
) -> ConsumeLoop:
    return ConsumeLoop(
        consumer, strategy, letters, name="test", max_attempts=max_attempts, poll_timeout_ms=1
    )


@pytest.mark.parametrize("kind", ["per-record", "key-concurrent"])
async def test_a_poison_record_is_dead_lettered_after_n_attempts_and_the_records_behind_it_are_handled(
    kind: str,
) -> None:
    log = {P0: [record(P0, o, k) for o, k in enumerate(["a", "poison", "a", "b", "poison"])]}
    consumer = LogConsumer(log)
    attempts: dict[int, int] = {}
    handled: list[int] = []

    async def handler(rec: Record) -> None:
        if rec.key == b"poison" and rec.offset == 1:
            attempts[rec.offset] = attempts.get(rec.offset, 0) + 1
            # What httpx raises for "acct-1\n" in a URL: not an httpx.HTTPError, not transient.
            raise ValueError("Invalid non-printable ASCII character in URL")
        handled.append(rec.offset)

    strategy: Strategy = PerRecord(handler) if kind == "per-record" else KeyConcurrent(handler)
    letters = Letters()
    loop = make_loop(consumer, strategy, letters, max_attempts=3)
    await run_until(loop, consumer.drained)
    assert attempts == {1: 3}
    assert [(r.offset, reason.split(":")[0]) for r, reason in letters.sent] == [
        (1, "failed 3 times")
    ]
    assert sorted(set(handled)) == [0, 2, 3, 4]
    assert consumer.committed == {P0: 5}
    assert loop.stats.retries["error"] == 2 and loop.stats.dead_letters == 1


async def test_a_transient_error_is_retried_past_the_attempt_bound_and_never_dead_lettered() -> (
    None
):
    consumer = LogConsumer({P0: [record(P0, 0, "a"), record(P0, 1, "b")]})
    failures = 0

    async def handler(rec: Record) -> None:
        nonlocal failures
        if rec.offset == 0 and failures < 7:
            failures += 1
            raise redis.exceptions.ConnectionError("Connection refused")

    letters = Letters()
    loop = make_loop(consumer, PerRecord(handler), letters, max_attempts=2)
    loop_task_condition = consumer.drained
    await run_until(loop, loop_task_condition, timeout=30)
    assert failures == 7
    assert letters.sent == []
    assert loop.stats.retries["transient"] == 7
    assert consumer.committed == {P0: 2}


async def test_a_refused_record_is_dead_lettered_at_once() -> None:
    from shared.kafka import MessageRejected

    consumer = LogConsumer({P0: [record(P0, 0, "a"), record(P0, 1, "b")]})

    async def handler(rec: Record) -> None:
        if rec.offset == 0:
            raise MessageRejected("unknown endpoint")

    letters = Letters()
    await run_until(make_loop(consumer, PerRecord(handler), letters), consumer.drained)
    assert [reason for _, reason in letters.sent] == ["unknown endpoint"]


@pytest.mark.parametrize(
    "error",
    [
        CommitFailedError("membership changed"),
        IllegalStateError("No partitions assigned"),
        RebalanceInProgressError(),
    ],
)
async def test_a_commit_failing_after_a_rebalance_does_not_end_the_loop(
    error: BaseException,
) -> None:
    consumer = LogConsumer({P0: [record(P0, 0, "a")]})
    consumer.commit_error = error
    seen: list[int] = []

    async def handler(rec: Record) -> None:
        seen.append(rec.offset)
        if len(seen) == 1:
            consumer.log[P0].append(record(P0, 1, "b"))

    loop = make_loop(consumer, PerRecord(handler), Letters())
    await run_until(loop, consumer.drained)
    # The first commit failed (logged); the loop went on and committed the next batch.
    assert seen == [0, 1]
    assert consumer.committed == {P0: 2}


async def test_a_seek_on_a_revoked_partition_does_not_end_the_loop() -> None:
    consumer = LogConsumer({P0: [record(P0, 0, "a"), record(P0, 1, "b")]})
    consumer.seek_error = IllegalStateError("Partition is not assigned")
    failed = False

    async def handler(rec: Record) -> None:
        nonlocal failed
        if rec.offset == 0 and not failed:
            failed = True
            raise redis.exceptions.TimeoutError("Timeout reading from socket")

    loop = make_loop(consumer, PerRecord(handler), Letters())
    task = asyncio.create_task(loop.run())
    try:
        await wait_for(lambda: loop.stats.retries["transient"] >= 1, timeout=5)
        after_failure = loop.last_poll
        # The loop fetches again after the failed seek: it did not end.
        await wait_for(lambda: loop.last_poll > after_failure, timeout=5)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_revocation_mid_batch_cancels_the_unfinished_work_and_commits_what_finished() -> (
    None
):
    # P0's record finishes; P1's hangs until the revocation cancels it.
    consumer = LogConsumer({P0: [record(P0, 0, "a")], P1: [record(P1, 0, "slow")]})
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(rec: Record) -> None:
        if rec.key == b"slow":
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    loop = ConsumeLoop(
        consumer, KeyConcurrent(handler), Letters(), name="test", poll_timeout_ms=1, drain_s=0.2
    )
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(started.wait(), 5)
        # What aiokafka's coordinator does before rejoining: awaits the listener, then moves
        # the partitions away.
        await asyncio.wait_for(loop.listener.on_partitions_revoked({P0, P1}), 5)
        consumer.owned = {P0}
        assert cancelled.is_set()
        assert consumer.committed == {P0: 1}  # finished work committed before giving it up
        await loop.listener.on_partitions_assigned({P0})
        # The loop goes on fetching after the rebalance (it did not end or crash).
        fetched = consumer.fetches
        await wait_for(lambda: consumer.fetches > fetched + 3, timeout=5, message="more fetches")
        assert not task.done(), "the revocation ended the loop"
        assert loop.member()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_member_without_partitions_counts_as_a_member() -> None:
    loop = make_loop(LogConsumer({}), PerRecord(lambda r: asyncio.sleep(0)), Letters())
    assert not loop.member()
    await loop.listener.on_partitions_assigned(set())
    assert loop.member()


async def test_a_crash_mid_batch_rewinds_so_a_restarted_loop_loses_nothing() -> None:
    consumer = LogConsumer({P0: [record(P0, o, f"k{o}") for o in range(4)]})
    handled: list[int] = []
    crashed = False

    class Crashy:
        async def handle(self, work: Any) -> None:
            nonlocal crashed
            for rec in work.batch[P0]:
                if rec.offset == 2 and not crashed:
                    crashed = True
                    raise RuntimeError("a bug in a strategy")
                await work.one(rec, lambda r: _append(handled, r.offset))

    loop = make_loop(consumer, Crashy(), Letters())
    supervisor = Supervisor(min_backoff_s=0.01)
    entry = supervisor.spawn("consumer:test", loop.run)
    try:
        await wait_for(consumer.drained, timeout=5)
    finally:
        await supervisor.stop()
    assert entry.restarts == 1
    assert sorted(set(handled)) == [0, 1, 2, 3]


async def _append(items: list[int], value: int) -> None:
    items.append(value)


async def test_a_failing_batch_is_split_so_its_poison_is_dead_lettered_and_the_rest_stored() -> (
    None
):
    log = {
        P0: [record(P0, 0, "a"), record(P0, 1, "poison"), record(P0, 2, "b")],
        P1: [record(P1, 0, "c")],
    }
    consumer = LogConsumer(log)
    stored: list[tuple[int, int]] = []

    async def store(records: list[Record]) -> Sequence[tuple[Record, str]]:
        if any(r.key == b"poison" for r in records):
            raise KeyError("a bug the poison triggers")
        stored.extend((r.partition, r.offset) for r in records)
        return ()

    letters = Letters()
    await run_until(make_loop(consumer, Batched(store), letters, max_attempts=2), consumer.drained)
    assert [(r.partition, r.offset) for r, _ in letters.sent] == [(0, 1)]
    assert sorted(set(stored)) == [(0, 0), (0, 2), (1, 0)]
    assert consumer.committed == {P0: 3, P1: 1}


def test_an_oversized_dead_letter_is_cut_to_the_bound_after_escaping() -> None:
    # Control characters grow 6-fold in JSON: cut before escaping, 64 KiB would not fit.
    huge = record(P0, 7, "\x00" * 200_000, value=b"\x01" * 900_000)
    letter = bounded_dead_letter(huge, "g", "reason " * 10_000)
    raw = letter.to_bytes()
    assert len(raw) <= DLQ_MAX_BYTES
    assert letter.payload_truncated and letter.payload
    assert letter.key is not None and len(letter.key) <= 1024 and "\x00" not in letter.key
    assert len(letter.reason) <= 4000
    assert json.loads(raw)["source_offset"] == 7


def test_a_letter_that_cannot_fit_becomes_a_minimal_one() -> None:
    letter = bounded_dead_letter(record(P0, 3, "k" * 900), "group", "r" * 5000, max_bytes=600)
    assert len(letter.to_bytes()) <= 600
    assert letter.key is None and letter.payload == "" and letter.source_offset == 3


async def test_the_supervisor_restarts_a_crashed_task_and_reports_it_down_meanwhile() -> None:
    runs = 0
    gate = asyncio.Event()

    async def task() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise redis.exceptions.ConnectionError("gone")
        await gate.wait()

    supervisor = Supervisor(min_backoff_s=0.2)
    entry = supervisor.spawn("replica", task)
    try:
        await wait_for(lambda: entry.restarts > 0, timeout=5, interval=0.001)
        assert supervisor.healthy() == {"replica": False}
        await wait_for(lambda: runs >= 2, timeout=5)
        assert supervisor.healthy() == {"replica": True}
    finally:
        await supervisor.stop()


async def test_a_running_task_that_reports_itself_stalled_is_not_healthy() -> None:
    stalled = False
    supervisor = Supervisor()
    supervisor.spawn("consumer:test", asyncio.Event().wait, stalled=lambda: stalled)
    try:
        await wait_for(lambda: supervisor.tasks["consumer:test"].running, timeout=5)
        assert supervisor.healthy() == {"consumer:test": True}
        stalled = True  # e.g. not back from a fetch for longer than the deadline
        assert supervisor.healthy() == {"consumer:test": False}
    finally:
        await supervisor.stop()
