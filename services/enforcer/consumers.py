"""The two command lanes: batched consume loops that turn EnforcePolicy commands into desired state."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeAlias

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from services.enforcer.adapters.metrics import EnforcerMetrics
from services.enforcer.domain import PRIORITY_LANE, Lane
from services.enforcer.handlers import EnforcerDeps, store_policy_commands
from shared import tracing
from shared.consume import Batched, PriorityGate
from shared.kafka import describe_validation_error
from shared.messages import EnforcePolicy, decode
from shared.topics import Topics

__all__ = ["PolicyCommands", "PriorityGate", "lane_strategy"]

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class PolicyCommands:
    """One lane's batch handler: decode a batch and store it in one Redis pipeline.

    Returns the records to dead-letter (malformed, or refused by the store); the consume loop
    sends them after the store succeeded, so a retried batch does not dead-letter twice, and
    commits only after the batch's effects are in Redis. A retried batch is harmless: the
    sequence fencing ignores what is already stored.
    """

    def __init__(
        self, topics: Topics, *, lane: Lane, deps: EnforcerDeps, metrics: EnforcerMetrics
    ) -> None:
        self._topics = topics
        self.lane = lane
        self._deps = deps
        self._metrics = metrics

    async def __call__(self, records: list[Record]) -> Sequence[tuple[Record, str]]:
        commands: list[EnforcePolicy] = []
        record_of: dict[int, Record] = {}
        dead: list[tuple[Record, str]] = []
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
        self._metrics.policies_stored.labels(self.lane).inc(result.stored)
        self._metrics.commands_ignored.labels(self.lane).inc(result.stale)
        self._metrics.commands_rejected.labels(self.lane).inc(len(dead))
        return dead


def lane_strategy(commands: PolicyCommands, gate: PriorityGate) -> Batched:
    """Each lane has its own consumer, group and fetch buffer, so a strict command on the
    priority lane never waits behind the normal lane's backlog; the gate makes the normal lane
    give way on the shared event loop while a priority batch is in hand (guarantee 5)."""
    return Batched(commands, gate=gate, priority=commands.lane == PRIORITY_LANE)
