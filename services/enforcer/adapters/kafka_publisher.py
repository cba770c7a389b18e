"""Publishes the enforcer's events: ``endpoints.v1``, ``isolation.status.v1`` and ``audit.v1``."""

from __future__ import annotations

from typing import Any

from shared.kafka import publish
from shared.messages import (
    AllowlistUsageReported,
    AuditRecorded,
    EndpointRegistered,
    PolicyStatusReported,
)
from shared.topics import Topics


class KafkaEventPublisher:
    """Each send waits for acks=all, so an answered request's event is in Kafka."""

    def __init__(self, producer: Any, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics

    async def endpoint_registered(self, message: EndpointRegistered) -> None:
        # Compacted topic keyed by endpoint_id: the latest registration is the endpoint's state.
        await publish(self._producer, self._topics.endpoints, message.endpoint_id, message)

    async def policy_status_reported(self, message: PolicyStatusReported) -> None:
        await publish(self._producer, self._topics.isolation_status, message.endpoint_id, message)

    async def allowlist_usage_reported(self, message: AllowlistUsageReported) -> None:
        # Keyed by endpoint like its status reports: one partition keeps an endpoint's order.
        await publish(self._producer, self._topics.isolation_status, message.endpoint_id, message)

    async def audit_recorded(self, message: AuditRecorded) -> None:
        # Keyed by account like every audit.v1 producer; acks=all before the caller hears back.
        key = message.account_id or message.actor.sub
        await publish(self._producer, self._topics.audit, key, message)
