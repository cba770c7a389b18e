"""Kafka publisher: enforcer commands on their lane, requests from the REST API, audit records."""

from __future__ import annotations

import asyncio
from typing import Any

from services.isolation.domain import Lane
from shared.kafka import publish
from shared.messages import (
    AuditRecorded,
    EnforcePolicy,
    IsolateEndpoint,
    ReleaseEndpoint,
    StrictIsolateAccount,
)
from shared.topics import Topics


class KafkaPublisher:
    """Every send waits for acks=all, so a caller that returns has its message in Kafka."""

    def __init__(self, producer: Any, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics

    async def send_command(self, lane: Lane, command: EnforcePolicy, audit: AuditRecorded) -> None:
        topic = (
            self._topics.enforcer_commands_priority
            if lane == "priority"
            else self._topics.enforcer_commands
        )
        await asyncio.gather(
            publish(self._producer, topic, command.policy.endpoint_id, command),
            self.send_audit(audit),
        )

    async def send_audit(self, audit: AuditRecorded) -> None:
        await publish(self._producer, self._topics.audit, audit.account_id or "", audit)

    async def send_request(
        self, lane: Lane, request: IsolateEndpoint | ReleaseEndpoint | StrictIsolateAccount
    ) -> None:
        topic = (
            self._topics.isolation_requests_priority
            if lane == "priority"
            else self._topics.isolation_requests
        )
        key = (
            request.account_id if isinstance(request, StrictIsolateAccount) else request.endpoint_id
        )
        await publish(self._producer, topic, key, request)
