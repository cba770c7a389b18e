"""A request lane that works on the partitions of a fetched batch concurrently."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import ConsumerRecord, TopicPartition

from shared.kafka import DeadLetterSink, Handler, TypedConsumer, make_consumer
from shared.runtime import Runtime

log = logging.getLogger(__name__)


class PartitionConcurrentConsumer(TypedConsumer):
    """TypedConsumer whose partitions run side by side; records of one partition stay in order.

    Requests are keyed by endpoint, so one endpoint's requests share a partition and are still
    applied one after the other; endpoints on different partitions no longer wait for each
    other's Redis and Kafka round trips. Offsets are committed per partition only up to the last
    record whose effects are stored and sent (at-least-once, as in TypedConsumer).
    """

    async def run(self) -> None:
        backoff = 0.1
        while True:
            batch = await self.consumer.getmany(timeout_ms=200, max_records=self._max_records)
            if self.consumer.assignment():
                self.assigned.set()
            if not batch:
                continue
            results = await asyncio.gather(
                *(self._run_partition(tp, records) for tp, records in batch.items())
            )
            commit = {tp: offset for tp, offset, _ in results if offset is not None}
            if commit:
                await self.consumer.commit(commit)
            if any(failed for _, _, failed in results):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1

    async def _run_partition(
        self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> tuple[TopicPartition, int | None, bool]:
        next_offset: int | None = None
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
                self.consumer.seek(tp, record.offset)
                return tp, next_offset, True
            next_offset = record.offset + 1
            self.processed += 1
        return tp, next_offset, False


def add_lane(runtime: Runtime, topic: str, *, group_id: str, handler: Handler, name: str) -> None:
    """Register a partition-concurrent consumer with the runtime (started and supervised by it)."""
    consumer = make_consumer(
        runtime.settings.kafka_bootstrap,
        topic,
        group_id=group_id,
        client_id=f"hostiso-{runtime.service}-{name}",
    )
    dlq = DeadLetterSink(
        runtime.producer, runtime.topics, group_id, runtime.dlq_total.labels(name).inc
    )
    runtime.consumers.append(
        PartitionConcurrentConsumer(consumer, runtime.topics, handler, dlq, name=name)
    )
