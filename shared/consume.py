"""The one consume loop every consumer runs: fetch, strategy, commit what is done, dead-letter poison.

A ``ConsumeLoop`` owns what every loop needs and is written once here: rebalance handling
(``RebalanceListener``), bounded retries of non-transient failures, dead letters, the commit of
each partition up to its first unfinished record, rewinding to it, and the liveness that
readiness reads. How the records of one fetched batch are handled is a ``Strategy``, composed
into the loop: ``PerRecord`` (in offset order per partition), ``KeyConcurrent`` (keys side by
side, each key in order) and ``Batched`` (one call per batch, behind an optional priority gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TypeAlias

import httpx
import redis.exceptions
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    NodeNotReadyError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    NotLeaderForPartitionError,
    RebalanceInProgressError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)
from pydantic import ValidationError

from shared import tracing
from shared.kafka import (
    PRODUCER_STATE_ERRORS,
    Handler,
    MessageRejected,
    describe_validation_error,
)
from shared.messages import decode
from shared.topics import Topics

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
Batch: TypeAlias = "dict[TopicPartition, list[Record]]"

# When the batch being handled was fetched (event-loop clock). Read-your-writes needs an end
# offset looked up AFTER the request was fetched; a lookup that started later may be shared.
FETCHED_AT: ContextVar[float | None] = ContextVar("hostiso_fetched_at", default=None)

DEFAULT_MAX_ATTEMPTS = 5

# Errors that say "the infrastructure is away for now", never "this record is bad": a record
# failing with one of them is retried with backoff for as long as it takes (counted as
# transient in the metrics), never dead-lettered. Anything else is counted against the record.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    # Kafka: broker down, leader moving, ISR short, request timeouts.
    KafkaConnectionError,
    KafkaTimeoutError,
    RequestTimedOutError,
    NotLeaderForPartitionError,
    LeaderNotAvailableError,
    NodeNotReadyError,
    NotEnoughReplicasError,
    NotEnoughReplicasAfterAppendError,
    UnknownTopicOrPartitionError,
    *PRODUCER_STATE_ERRORS,
    # Redis: connection lost or refused, command timed out, loading after a restart.
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    # Redis Cluster failover: no reachable node or slot owner, cluster down, slot migrating.
    redis.exceptions.RedisClusterException,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    # HTTP: could not connect, connection dropped, timed out (not InvalidURL, not a 4xx).
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    # The OS: refused / reset sockets, asyncio timeouts.
    ConnectionError,
    TimeoutError,
)

# What commit() and seek() raise once the partitions moved to another member: the records are
# redelivered to their new owner (at-least-once), so the loop logs and carries on.
REBALANCE_ERRORS: tuple[type[BaseException], ...] = (
    CommitFailedError,
    IllegalStateError,
    RebalanceInProgressError,
)


class Consumer(Protocol):
    """The part of AIOKafkaConsumer the loop uses (the Kafka seam, typed)."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = ..., max_records: int | None = ...
    ) -> dict[TopicPartition, list[Record]]: ...

    def assignment(self) -> set[TopicPartition]: ...

    async def commit(self, offsets: dict[TopicPartition, int] | None = ...) -> None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class DeadLetters(Protocol):
    """Where poison goes (``shared.kafka.DeadLetterSink``)."""

    async def send(self, record: Record, reason: str) -> None: ...


RecordHandler = Callable[[Record], Awaitable[None]]
# A batch handler returns the records it refuses, with their reasons (dead-lettered).
BatchHandler = Callable[[list[Record]], Awaitable[Sequence[tuple[Record, str]]]]


class Outcome(Enum):
    DONE = "done"
    TRANSIENT = "transient"
    FAILED = "failed"


@dataclass
class LoopStats:
    """Counters the runtime exports on /metrics."""

    processed: int = 0
    dead_letters: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    restarts: int = 0


class Work:
    """What a strategy gets for one batch: run records guarded, and the loop learns what is done.

    ``run`` never raises (except a cancel): a failure is an ``Outcome``. A record counts as done
    once its action returned or it was dead-lettered; the loop commits each partition up to
    its first record that is not done.
    """

    def __init__(self, loop: ConsumeLoop, batch: Batch) -> None:
        self._loop = loop
        self.batch = batch
        self.done: set[tuple[TopicPartition, int]] = set()
        self._warned_transient = False

    def is_done(self, record: Record) -> bool:
        return (TopicPartition(record.topic, record.partition), record.offset) in self.done

    def _mark(self, record: Record) -> None:
        self.done.add((TopicPartition(record.topic, record.partition), record.offset))
        self._loop.stats.processed += 1

    async def one(self, record: Record, handler: RecordHandler) -> Outcome:
        async def action() -> Sequence[tuple[Record, str]]:
            await handler(record)
            return ()

        return await self.run([record], action)

    async def run(
        self, records: list[Record], action: Callable[[], Awaitable[Sequence[tuple[Record, str]]]]
    ) -> Outcome:
        """Run ``action`` for ``records``; a single record is retried at most max_attempts times."""
        loop = self._loop
        try:
            refused = await action()
        except asyncio.CancelledError:
            raise
        except MessageRejected as exc:
            refused = [(r, exc.reason) for r in records]
        except Exception as exc:
            return await self._failed(records, exc)
        try:
            for record, reason in refused:
                await loop.dead_letter(record, reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The effects are stored; the letters are not. Retrying the records repeats the
            # (idempotent) effects and sends the letters then.
            return await self._failed(records, exc, counted=False)
        for record in records:
            loop.forget_attempts(record)
            self._mark(record)
        return Outcome.DONE

    async def _failed(
        self, records: list[Record], exc: Exception, *, counted: bool = True
    ) -> Outcome:
        loop = self._loop
        first = records[0]
        if loop.is_transient(exc):
            loop.stats.retries["transient"] += 1
            # An outage fails every record of the batch alike: one warning per batch says it.
            level = logging.DEBUG if self._warned_transient else logging.WARNING
            self._warned_transient = True
            log.log(
                level,
                "transient failure; will retry: %r",
                exc,
                extra={"consumer": loop.name, "topic": first.topic, "offset": first.offset},
            )
            return Outcome.TRANSIENT
        if len(records) != 1 or not counted:
            loop.stats.retries["error"] += 1
            log.warning("batch failed: %r", exc, extra={"consumer": loop.name})
            return Outcome.FAILED
        attempts = loop.count_attempt(first)
        if attempts < loop.max_attempts:
            loop.stats.retries["error"] += 1
            log.warning(
                "handler failed (attempt %d of %d); will retry",
                attempts,
                loop.max_attempts,
                exc_info=exc,
                extra={"consumer": loop.name, "topic": first.topic, "offset": first.offset},
            )
            return Outcome.FAILED
        reason = f"failed {attempts} times: {type(exc).__name__}: {exc}"
        try:
            await loop.dead_letter(first, reason)
        except asyncio.CancelledError:
            raise
        except Exception as dlq_exc:
            log.warning("dead letter not sent; will retry: %r", dlq_exc)
            return Outcome.TRANSIENT
        loop.forget_attempts(first)
        self._mark(first)
        return Outcome.DONE


class Strategy(Protocol):
    """Hands the records of one fetched batch to the handler, respecting their order rules.

    A strategy stops a partition (or a key's chain) at its first record that is not done; the
    loop rewinds the partition to that record and commits what came before it.
    """

    async def handle(self, work: Work) -> None: ...


class PerRecord:
    """Each partition's records in offset order, one at a time."""

    def __init__(self, handler: RecordHandler) -> None:
        self._handler = handler

    async def handle(self, work: Work) -> None:
        for records in work.batch.values():
            for record in records:
                if await work.one(record, self._handler) is not Outcome.DONE:
                    break


class KeyConcurrent:
    """Records of different keys side by side (at most ``max_in_flight``), one key's in order.

    The record key is the ordering key: only records of one key depend on each other, so they
    are chained in offset order and every other chain runs concurrently. A failure stops the
    rest of its chain: its order must hold across the retry.
    """

    def __init__(self, handler: RecordHandler, *, max_in_flight: int = 256) -> None:
        self._handler = handler
        self._max_in_flight = max_in_flight

    async def handle(self, work: Work) -> None:
        chains: dict[tuple[TopicPartition, bytes | None], list[Record]] = defaultdict(list)
        for tp, records in work.batch.items():
            for record in records:
                chains[(tp, record.key)].append(record)
        pending = deque(chains.values())

        async def worker() -> None:
            while pending:
                for record in pending.popleft():
                    if await work.one(record, self._handler) is not Outcome.DONE:
                        break

        # A fixed set of workers takes one chain at a time: at most max_in_flight records run
        # at once, and one key's records never overlap.
        await asyncio.gather(*(worker() for _ in range(min(self._max_in_flight, len(pending)))))


class PriorityGate:
    """Lets a normal lane give way while the priority lane has a batch in hand.

    Both lanes share one event loop. Without the gate a strict command fetched by the priority
    lane waits behind whatever normal batch holds the loop; with it, the normal lane stops
    before its next batch until the priority batch is stored and committed (guarantee 5).
    """

    def __init__(self) -> None:
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self._busy += 1
        self._idle.clear()

    def leave(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Batched:
    """One handler call for the whole batch (one Redis pipeline), behind an optional gate.

    A batch that fails with a non-transient error is handled again record by record, so the
    poison is found, retried on its own and dead-lettered, while the records around it go on.
    """

    def __init__(
        self, handler: BatchHandler, *, gate: PriorityGate | None = None, priority: bool = False
    ) -> None:
        self._handler = handler
        self._gate = gate
        self._priority = priority

    async def handle(self, work: Work) -> None:
        if self._gate is None:
            await self._handle(work)
            return
        if not self._priority:
            await self._gate.wait_idle()
            await self._handle(work)
            return
        self._gate.enter()
        try:
            await self._handle(work)
        finally:
            self._gate.leave()

    async def _handle(self, work: Work) -> None:
        records = [r for rs in work.batch.values() for r in rs]
        outcome = await work.run(records, lambda: self._handler(records))
        if outcome is not Outcome.FAILED or len(records) == 1:
            return
        for rs in work.batch.values():
            for record in rs:
                single = [record]
                if (
                    await work.run(single, functools.partial(self._handler, single))
                    is not Outcome.DONE
                ):
                    break


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells its loop about revocations and assignments (``subscribe(..., listener=this)``).

    Made before the consumer (which needs it) and bound to the loop (which needs the consumer).
    """

    def __init__(self) -> None:
        self._loop: ConsumeLoop | None = None

    def bind(self, loop: ConsumeLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._loop is not None:
            await self._loop.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._loop is not None:
            self._loop.on_assigned(set(assigned))


class ConsumeLoop:
    """At-least-once: fetch a batch, let the strategy handle it, commit what is done, rewind.

    Offsets are committed per partition only up to the first record that is not done (guarantee
    9); that record and those after it are fetched again after a backoff. A refused record
    (``MessageRejected``) is dead-lettered at once; one that keeps failing with a non-transient
    error is dead-lettered after ``max_attempts``; transient errors are retried without limit.
    A revocation waits (at most ``drain_s``) for the batch in hand, then cancels it; what
    finished is committed, the rest is the new owner's. Commit and seek failures caused by a
    rebalance are logged, never raised.
    """

    def __init__(
        self,
        consumer: Consumer,
        strategy: Strategy,
        dlq: DeadLetters,
        *,
        name: str,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        transient: tuple[type[BaseException], ...] = (),
        on_batch_done: Callable[[], Awaitable[None]] | None = None,
        after_batch: Callable[[], Awaitable[None]] | None = None,
        drain_s: float = 5.0,
        group: bool = True,
        listener: RebalanceListener | None = None,
    ) -> None:
        self.consumer = consumer
        self.strategy = strategy
        self.name = name
        self.max_attempts = max_attempts
        self._dlq = dlq
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        self._transient = TRANSIENT_ERRORS + transient
        self._on_batch_done = on_batch_done
        self._after_batch = after_batch
        self._drain_s = drain_s
        self._group = group
        self._attempts: dict[tuple[TopicPartition, int], int] = {}
        self._work: Work | None = None
        self._batch_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = LoopStats()
        self.listener = listener or RebalanceListener()
        self.listener.bind(self)
        # Membership: set once the group assigned this member its share (possibly nothing).
        self.assigned = asyncio.Event()
        self._rebalancing_since: float | None = None
        # Liveness: when the loop last came back from a fetch (monotonic clock).
        self.last_poll = time.monotonic()

    @property
    def processed(self) -> int:
        return self.stats.processed

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, self._transient)

    def count_attempt(self, record: Record) -> int:
        key = (TopicPartition(record.topic, record.partition), record.offset)
        self._attempts[key] = self._attempts.get(key, 0) + 1
        return self._attempts[key]

    def forget_attempts(self, record: Record) -> None:
        self._attempts.pop((TopicPartition(record.topic, record.partition), record.offset), None)

    async def dead_letter(self, record: Record, reason: str) -> None:
        await self._dlq.send(record, reason)
        self.stats.dead_letters += 1

    def member(self, *, rebalance_grace_s: float = 60.0) -> bool:
        """A member of its group (owning partitions or not); a rebalance is given a grace time."""
        if not self._group:
            return True
        if not self.assigned.is_set():
            return False
        since = self._rebalancing_since
        return since is None or time.monotonic() - since < rebalance_grace_s

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._rebalancing_since = None
        self.assigned.set()
        log.info("partitions assigned", extra={"consumer": self.name, "partitions": len(assigned)})

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._rebalancing_since = time.monotonic()
        if revoked and not self._idle.is_set():
            # Let the batch in hand finish and be committed while this member still owns it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self._drain_s)
            task = self._batch_task
            if not self._idle.is_set() and task is not None:
                log.warning("revocation: cancelling the unfinished batch of %s", self.name)
                task.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), self._drain_s)
        for key in [k for k in self._attempts if k[0] in revoked]:
            del self._attempts[key]

    async def run(self) -> None:
        """The loop; a crash rewinds the batch in hand first, so a restarted loop loses nothing."""
        backoff = 0.1
        while True:
            batch = await self.consumer.getmany(
                timeout_ms=self._poll_timeout_ms, max_records=self._max_records
            )
            self.last_poll = time.monotonic()
            if not self._group or self.consumer.assignment():
                self.assigned.set()
            if not batch:
                continue
            work = Work(self, batch)
            self._idle.clear()
            try:
                finished = await self._handle(work)
            finally:
                self._idle.set()
            if finished:
                backoff = 0.1
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _handle(self, work: Work) -> bool:
        """Run the strategy on a batch, commit and rewind; True if every record is done."""
        token = FETCHED_AT.set(asyncio.get_running_loop().time())
        try:
            self._batch_task = asyncio.create_task(self.strategy.handle(work))
            try:
                await asyncio.shield(self._batch_task)
            except asyncio.CancelledError:
                if not self._batch_task.cancelled():
                    # This task was cancelled (shutdown): stop the batch too, then re-raise.
                    self._batch_task.cancel()
                    with contextlib.suppress(BaseException):
                        await self._batch_task
                    self._rewind(work)
                    raise
                # The batch was cancelled by a revocation: commit what finished.
            except Exception:
                self._rewind(work)
                raise
        finally:
            FETCHED_AT.reset(token)
            self._batch_task = None
        commit, rewind = self._positions(work)
        if commit and self._on_batch_done is not None:
            await self._on_batch_done()
        if commit:
            await self._commit(commit)
        self._seek(rewind)
        if self._after_batch is not None:
            # After the rewind: a position read here counts only records that are done.
            await self._after_batch()
        return not rewind

    def _positions(self, work: Work) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        commit: dict[TopicPartition, int] = {}
        rewind: dict[TopicPartition, int] = {}
        for tp, records in work.batch.items():
            upto = records[-1].offset + 1
            for record in records:
                if (tp, record.offset) not in work.done:
                    upto = record.offset
                    rewind[tp] = upto
                    break
            if upto > records[0].offset:
                commit[tp] = upto
        return commit, rewind

    def _rewind(self, work: Work) -> None:
        self._seek(self._positions(work)[1])

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not self._group:
            return
        # Only partitions still owned: one revoked meanwhile would fail the whole commit.
        owned = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in offsets.items() if tp in owned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except REBALANCE_ERRORS as exc:
            # The partitions moved on: their new owner re-reads from the last commit.
            log.warning("commit skipped after a rebalance: %r", exc, extra={"consumer": self.name})
        except KafkaError as exc:
            self.stats.retries["commit"] += 1
            log.warning("commit failed: %r", exc, extra={"consumer": self.name})

    def _seek(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            try:
                self.consumer.seek(tp, offset)
            except REBALANCE_ERRORS:
                # A partition revoked meanwhile is re-read by its new owner from the last commit.
                continue


def typed(topics: Topics, handler: Handler) -> RecordHandler:
    """A record handler that decodes the record for ``handler`` (traced when tracing is on).

    A record that does not decode, or that ``handler`` refuses, raises ``MessageRejected``:
    the loop dead-letters it at once, since retrying cannot make it valid.
    """

    async def decode_and_handle(record: Record, span: Any) -> None:
        try:
            message = decode(topics.unprefixed(record.topic), record.value)
        except ValidationError as exc:
            raise MessageRejected(describe_validation_error(exc)) from exc
        except ValueError as exc:
            raise MessageRejected(f"invalid message: {exc}") from exc
        if span is None:
            await handler(message, record)
            return
        with tracing.handling(span, record, message):
            await handler(message, record)

    async def handle(record: Record) -> None:
        if not tracing.enabled():
            await decode_and_handle(record, None)
            return
        with tracing.consume_span(record) as span:
            try:
                await decode_and_handle(record, span)
            except MessageRejected as exc:
                tracing.record_error(span, exc, dead_lettered=True)
                raise

    return handle
