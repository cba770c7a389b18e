"""Audit events of refused attempts, published best-effort to ``audit.v1``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.settings.metrics import SettingsMetrics
from shared.kafka import publish
from shared.messages import AuditRecorded
from shared.topics import Topics

log = logging.getLogger(__name__)


class KafkaAuditSink:
    """Publishes refusals (403/409/412/422) directly; changes travel through the outbox instead.

    A refusal changes nothing, so there is no state to keep consistent with its audit event:
    the request waits a short deadline for Kafka's acknowledgement, then logs and counts.
    """

    def __init__(
        self, producer: Any, topics: Topics, metrics: SettingsMetrics, timeout_s: float
    ) -> None:
        self._producer = producer
        self._topics = topics
        self._metrics = metrics
        self._timeout_s = timeout_s

    async def record(self, audit: AuditRecorded) -> None:
        key = audit.account_id or audit.actor.sub
        try:
            await asyncio.wait_for(
                publish(self._producer, self._topics.audit, key, audit), self._timeout_s
            )
        except Exception as exc:
            self._metrics.audit_failures.inc()
            log.error(
                "could not publish an audit event of a refused attempt: %r",
                exc,
                extra={
                    "account_id": audit.account_id,
                    "action": audit.action,
                    "outcome": audit.outcome,
                    "audit": audit.model_dump_json(),
                },
            )
