"""Kafka publisher: enforcer commands on their lane, requests from the REST API, audit records."""

from __future__ import annotations

import asyncio
from typing import Any

from services.isolation.domain import Lane
from shared import tracing
from shared.kafka import publish
from shared.messages import (
    AuditRecorded,
    EnforcePolicy,
    IsolateEndpoint,
    IsolationStateChanged,
    Message,
    RefreshIsolation,
    ReleaseEndpoint,
    RevokeEndpointPeer,
    StrictIsolateAccount,
)
from shared.topics import Topics

_FAN_OUT_CHUNK = 5_000


class KafkaPublisher:
    """Every send waits for acks=all, so a caller that returns has its message in Kafka."""

    def __init__(self, producer: Any, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics

    async def send_command(
        self,
        lane: Lane,
        command: EnforcePolicy,
        audit: AuditRecorded,
        event: IsolationStateChanged | None = None,
    ) -> None:
        topic = (
            self._topics.enforcer_commands_priority
            if lane == "priority"
            else self._topics.enforcer_commands
        )
        # The records are handed to the producer before waiting: they ride the batches it
        # builds for every request in flight, and the caller returns once all are acknowledged.
        acks = [
            await self._enqueue(topic, command.policy.endpoint_id, command),
            await self._enqueue(self._topics.audit, audit.account_id or "", audit),
        ]
        if event is not None:
            acks.append(
                await self._enqueue(self._topics.isolation_events, event.endpoint_id, event)
            )
        await asyncio.gather(*acks)

    async def send_event(self, event: IsolationStateChanged) -> None:
        await publish(self._producer, self._topics.isolation_events, event.endpoint_id, event)

    async def _enqueue(self, topic: str, key: str, message: Message) -> asyncio.Future[Any]:
        """The acknowledgement of ``message``, once the producer holds it."""
        if tracing.enabled():
            # publish() adds the trace context to the record's headers.
            return asyncio.ensure_future(publish(self._producer, topic, key, message))
        future: asyncio.Future[Any] = await self._producer.send(
            topic, message.to_bytes(), key=key.encode()
        )
        return future

    async def send_audit(self, audit: AuditRecorded) -> None:
        await publish(self._producer, self._topics.audit, audit.account_id or "", audit)

    def _request_topic(self, lane: Lane) -> str:
        if lane == "priority":
            return self._topics.isolation_requests_priority
        return self._topics.isolation_requests

    async def send_request(
        self,
        lane: Lane,
        request: IsolateEndpoint
        | ReleaseEndpoint
        | StrictIsolateAccount
        | RevokeEndpointPeer
        | RefreshIsolation,
    ) -> None:
        topic = self._request_topic(lane)
        key = (
            request.account_id if isinstance(request, StrictIsolateAccount) else request.endpoint_id
        )
        await publish(self._producer, topic, key, request)

    async def send_requests(
        self, lane: Lane, requests: list[IsolateEndpoint | RevokeEndpointPeer]
    ) -> None:
        """Every request handed to the producer, then all acknowledged (a fan-out)."""
        topic = self._request_topic(lane)
        # Chunks bound the futures in flight; within a chunk the sends ride shared batches.
        for start in range(0, len(requests), _FAN_OUT_CHUNK):
            chunk = requests[start : start + _FAN_OUT_CHUNK]
            await asyncio.gather(*[await self._enqueue(topic, r.endpoint_id, r) for r in chunk])
