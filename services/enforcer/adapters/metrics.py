"""Prometheus metrics of the enforcer: stored policies by lane, delivery states, waiting agents."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class EnforcerMetrics:
    """Counters the lanes and routes update; gauges refreshed from Redis (shared by instances)."""

    def __init__(self, registry: CollectorRegistry, waiting_count: Callable[[], int]) -> None:
        self.policies_stored = Counter(
            "hostiso_enforcer_policies_stored_total",
            "Policies that became an endpoint's desired policy, by lane",
            ["lane"],
            registry=registry,
        )
        self.commands_ignored = Counter(
            "hostiso_enforcer_commands_ignored_total",
            "Commands that changed nothing (older or duplicate sequence), by lane",
            ["lane"],
            registry=registry,
        )
        self.commands_rejected = Counter(
            "hostiso_enforcer_commands_rejected_total",
            "Commands sent to the DLQ (invalid or for another account's endpoint), by lane",
            ["lane"],
            registry=registry,
        )
        self.status_reports = Counter(
            "hostiso_enforcer_status_reports_total",
            "Agent status reports published, by status",
            ["status"],
            registry=registry,
        )
        self.enrollments = Counter(
            "hostiso_enforcer_enrollments_total",
            "Enrollment attempts, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.delivery = Gauge(
            "hostiso_enforcer_endpoints_by_delivery_state",
            "Endpoints whose desired policy is pending, applied or failed (all instances)",
            ["state"],
            registry=registry,
        )
        waiting = Gauge(
            "hostiso_enforcer_waiting_agents",
            "Agents long-polling on this process right now",
            registry=registry,
        )
        waiting.set_function(lambda: float(waiting_count()))

    async def refresh_forever(
        self, delivery_counts: Callable[[], Awaitable[dict[str, int]]], interval: float = 5.0
    ) -> None:
        while True:
            try:
                for state, count in (await delivery_counts()).items():
                    self.delivery.labels(state).set(count)
            except (RedisError, OSError) as exc:
                log.warning("could not refresh delivery-state gauges: %r", exc)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # On Python 3.11 a cancel that lands inside a Redis call can be swallowed by
                # redis-py's wait_for/timeout: honour it, or shutdown waits on this loop forever.
                raise asyncio.CancelledError
            await asyncio.sleep(interval)
