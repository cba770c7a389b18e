"""Publishes the enforcer's events: ``endpoints.v1``, ``isolation.status.v1`` and ``audit.v1``."""

from __future__ import annotations

import asyncio
from typing import Any

from shared import tracing
from shared.kafka import publish
from shared.messages import (
    AllowlistUsageReported,
    AuditRecorded,
    EndpointRegistered,
    Message,
    PolicyStatusReported,
)
from shared.topics import Topics

# Reports arriving within this long of the first are handed to the producer in one step.
REPORT_WINDOW_S = 0.003


class ReportBatcher:
    """Hands the status reports that arrive within ``window_s`` to the producer together.

    The producer lingers each partition's batch from the moment its first record arrives, so
    reports trickling in over a few milliseconds end up in batches that are due at different
    moments, and in different produce requests. Appended in one step, the batches of every
    partition are due together and leave in one request per broker. Each caller still waits for
    its own record's acknowledgement (acks=all) and gets its own error.
    """

    def __init__(self, producer: Any, window_s: float = REPORT_WINDOW_S) -> None:
        self._producer = producer
        self._window_s = window_s
        self._pending: list[tuple[str, bytes, bytes, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, topic: str, key: str, message: Message) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((topic, key.encode(), message.to_bytes(), done))
        if self._timer is None:
            self._timer = loop.call_later(self._window_s, self._flush)
        await done

    def _flush(self) -> None:
        self._timer = None
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[str, bytes, bytes, asyncio.Future[None]]]) -> None:
        for topic, key, value, done in batch:
            try:
                sent = await self._producer.send(topic, value, key=key)
            except BaseException as exc:  # handed to its caller, who raises it
                _settle(done, exc)
                if isinstance(exc, asyncio.CancelledError):
                    for _, _, _, rest in batch:
                        _settle(rest, exc)
                    raise
                continue
            sent.add_done_callback(lambda acked, done=done: _settle_from(done, acked))


def _settle(done: asyncio.Future[None], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


def _settle_from(done: asyncio.Future[None], acked: asyncio.Future[Any]) -> None:
    if done.done():
        return  # the caller gave up (cancelled); the record is sent all the same
    if acked.cancelled():
        done.set_exception(asyncio.CancelledError())
    elif (error := acked.exception()) is not None:
        done.set_exception(error)
    else:
        done.set_result(None)


class KafkaEventPublisher:
    """Each send waits for acks=all, so an answered request's event is in Kafka."""

    def __init__(self, producer: Any, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics
        self._reports = ReportBatcher(producer)

    async def endpoint_registered(self, message: EndpointRegistered) -> None:
        # Compacted topic keyed by endpoint_id: the latest registration is the endpoint's state.
        await publish(self._producer, self._topics.endpoints, message.endpoint_id, message)

    async def policy_status_reported(self, message: PolicyStatusReported) -> None:
        await self._report(message.endpoint_id, message)

    async def allowlist_usage_reported(self, message: AllowlistUsageReported) -> None:
        # Keyed by endpoint like its status reports: one partition keeps an endpoint's order.
        await self._report(message.endpoint_id, message)

    async def _report(self, endpoint_id: str, message: Message) -> None:
        topic = self._topics.isolation_status
        if tracing.enabled():
            # Traced records carry their span's context in their headers: sent one by one.
            await publish(self._producer, topic, endpoint_id, message)
            return
        await self._reports.publish(topic, endpoint_id, message)

    async def audit_recorded(self, message: AuditRecorded) -> None:
        # Keyed by account like every audit.v1 producer; acks=all before the caller hears back.
        key = message.account_id or message.actor.sub
        await publish(self._producer, self._topics.audit, key, message)
