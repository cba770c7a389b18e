"""A request lane that works on the keys of a fetched batch concurrently, each key in order."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from contextvars import ContextVar
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from shared.kafka import DeadLetterSink, Handler, TypedConsumer, make_consumer
from shared.runtime import Runtime
from shared.topics import Topics

log = logging.getLogger(__name__)

# When the record being handled was fetched (event-loop clock). Read-your-writes needs an end
# offset looked up AFTER the request was fetched; a lookup that started later may be shared.
FETCHED_AT: ContextVar[float | None] = ContextVar("hostiso_isolation_fetched_at", default=None)

MAX_RECORDS = 1000
MAX_IN_FLIGHT = 256

ChainKey = tuple[TopicPartition, bytes | None]


class KeyConcurrentConsumer(TypedConsumer):
    """TypedConsumer whose records of different keys run side by side; one key's stay in order.

    The record key is the ordering key (endpoint_id for endpoint requests, account_id for the
    account-wide strict): only records of one key depend on each other, so they are chained in
    offset order and every other key runs concurrently (at most ``max_in_flight`` records at a
    time). Offsets are committed per partition only up to the first record that did not finish,
    which keeps at-least-once: a record that failed transiently, and everything after it in its
    partition, is fetched again after a backoff (finished records are then repeated, which the
    handlers absorb by request id). Refused and malformed records go to the DLQ as before.
    """

    def __init__(
        self,
        consumer: Any,
        topics: Topics,
        handler: Handler,
        dlq: DeadLetterSink,
        *,
        name: str,
        max_records: int = MAX_RECORDS,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        super().__init__(consumer, topics, handler, dlq, name=name, max_records=max_records)
        self._max_in_flight = max_in_flight

    async def run(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.consumer.getmany(timeout_ms=200, max_records=self._max_records)
            if self.consumer.assignment():
                self.assigned.set()
            if not batch:
                continue
            # Set in this task's context before the chains' tasks copy it.
            FETCHED_AT.set(loop.time())
            commit, failed = await self._run_batch(batch)
            for tp, offset in failed.items():
                self.consumer.seek(tp, offset)
            if commit:
                if self._on_batch_done is not None:
                    await self._on_batch_done()
                await self.consumer.commit(commit)
            if failed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1

    async def _run_batch(
        self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        chains: dict[ChainKey, list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
        for tp, records in batch.items():
            for record in records:
                chains[(tp, record.key)].append(record)
        pending = deque(chains.items())
        failed: dict[TopicPartition, int] = {}
        # A fixed set of workers takes one key's chain at a time: at most max_in_flight records
        # run at once, and one key's records never overlap.
        workers = min(self._max_in_flight, len(pending))
        await asyncio.gather(*(self._work(pending, failed) for _ in range(workers)))
        commit: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            upto = failed.get(tp, records[-1].offset + 1)
            if upto > records[0].offset:
                commit[tp] = upto
        return commit, failed

    async def _work(
        self,
        pending: deque[tuple[ChainKey, list[ConsumerRecord[bytes, bytes]]]],
        failed: dict[TopicPartition, int],
    ) -> None:
        while pending:
            (tp, _), records = pending.popleft()
            for record in records:
                try:
                    await self._handle_one(record)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "handler failed; will retry",
                        extra={"consumer": self.name, "topic": tp.topic, "offset": record.offset},
                    )
                    # The rest of this key's chain waits for the retry: its order must hold.
                    failed[tp] = min(failed.get(tp, record.offset), record.offset)
                    break
                self.processed += 1


def add_lane(
    runtime: Runtime,
    topic: str,
    *,
    group_id: str,
    handler: Handler,
    name: str,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> None:
    """Register a key-concurrent consumer with the runtime (started and supervised by it)."""
    consumer = make_consumer(
        runtime.settings.kafka_bootstrap,
        topic,
        group_id=group_id,
        client_id=f"hostiso-{runtime.service}-{name}",
        options=runtime.kafka_options,
    )
    dlq = DeadLetterSink(
        runtime.producer, runtime.topics, group_id, runtime.dlq_total.labels(name).inc
    )
    runtime.consumers.append(
        KeyConcurrentConsumer(
            consumer, runtime.topics, handler, dlq, name=name, max_in_flight=max_in_flight
        )
    )
