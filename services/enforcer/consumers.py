"""The two command lanes: batched consume loops that turn EnforcePolicy commands into desired state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeAlias

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError
from pydantic import ValidationError

from services.enforcer.adapters.metrics import EnforcerMetrics
from services.enforcer.domain import PRIORITY_LANE, Lane
from services.enforcer.handlers import EnforcerDeps, store_policy_commands
from shared import tracing
from shared.kafka import DeadLetterSink, TypedConsumer, describe_validation_error
from shared.messages import EnforcePolicy, decode
from shared.topics import Topics

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


async def _no_single_record_handler(message: Any, record: Record) -> None:
    raise RuntimeError("command lanes handle whole batches, not single records")


class PriorityGate:
    """Lets the normal lane give way while the priority lane has a batch in hand.

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


class PolicyCommandLane(TypedConsumer):
    """At-least-once, batched: decode a batch, store it in one Redis pipeline, then commit.

    Each lane has its own consumer (and group), task and fetch buffer, so a strict command on
    the priority lane never waits behind the normal lane's backlog (guarantee 5). Offsets are
    committed only after the batch's effects are in Redis; a failed batch is rewound and
    retried, which the sequence fencing makes harmless.
    """

    def __init__(
        self,
        consumer: Any,
        topics: Topics,
        dlq: DeadLetterSink,
        *,
        lane: Lane,
        deps: EnforcerDeps,
        metrics: EnforcerMetrics,
        max_records: int,
        gate: PriorityGate | None = None,
        poll_timeout_ms: int = 200,
    ) -> None:
        super().__init__(
            consumer,
            topics,
            _no_single_record_handler,
            dlq,
            name=f"commands-{lane}",
            max_records=max_records,
        )
        self.lane = lane
        self._deps = deps
        self._metrics = metrics
        self._poll_timeout_ms = poll_timeout_ms
        self._gate = gate

    async def run(self) -> None:
        backoff = 0.1
        while True:
            batch: dict[TopicPartition, list[Record]] = await self.consumer.getmany(
                timeout_ms=self._poll_timeout_ms, max_records=self._max_records
            )
            if self.consumer.assignment():
                self.assigned.set()
            if not batch:
                continue
            if self._gate is not None and self.lane == PRIORITY_LANE:
                self._gate.enter()
            elif self._gate is not None:
                await self._gate.wait_idle()
            try:
                await self._apply(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("command batch failed; will retry", extra={"lane": self.lane})
                self._rewind(batch)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                if self._gate is not None and self.lane == PRIORITY_LANE:
                    self._gate.leave()
            backoff = 0.1

    def _rewind(self, batch: dict[TopicPartition, list[Record]]) -> None:
        assigned = self.consumer.assignment()
        for tp, records in batch.items():
            if tp in assigned and records:
                # A partition revoked meanwhile is re-read by its new owner from the last commit.
                with contextlib.suppress(IllegalStateError):
                    self.consumer.seek(tp, records[0].offset)

    async def _apply(self, batch: dict[TopicPartition, list[Record]]) -> None:
        commands: list[EnforcePolicy] = []
        record_of: dict[int, Record] = {}
        dead: list[tuple[Record, str]] = []
        for records in batch.values():
            for record in records:
                try:
                    message = decode(self._topics.unprefixed(record.topic), record.value)
                except ValidationError as exc:
                    dead.append((record, describe_validation_error(exc)))
                    continue
                except ValueError as exc:
                    dead.append((record, f"invalid message: {exc}"))
                    continue
                tracing.record_received(record, message)
                commands.append(message)
                record_of[id(message)] = record
        result = await store_policy_commands(self._deps, commands, self.lane)
        dead.extend((record_of[id(command)], reason) for command, reason in result.rejected)
        # Dead letters after the store succeeded: a retried batch does not dead-letter twice.
        for record, reason in dead:
            await self._dlq.send(record, reason)
        await self.consumer.commit(
            {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
        )
        self.processed += sum(len(records) for records in batch.values())
        self._metrics.policies_stored.labels(self.lane).inc(result.stored)
        self._metrics.commands_ignored.labels(self.lane).inc(result.stale)
        self._metrics.commands_rejected.labels(self.lane).inc(len(dead))
