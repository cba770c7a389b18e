"""Last seen: an agent's long poll republishes its registration with ``last_seen``, throttled.

``endpoints.v1`` is compacted by endpoint, so each update carries the full registration. One
update per endpoint per ``HOSTISO_LAST_SEEN_INTERVAL_S`` at most: a ``SET NX EX`` on a key of
the endpoint's own slot decides which poll (of any enforcer instance) publishes. Presence never
delays or fails a poll: the update runs beside it, and a failed publish frees the interval so
the next poll tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

from aiokafka.errors import KafkaError
from fastapi import Request
from pydantic import ValidationError
from redis.exceptions import RedisError

from services.enforcer.adapters.redis_store import EnforcerKeys
from shared.messages import EndpointRegistered, utcnow
from shared.redis import Keys, RedisClient, slot_tag

log = logging.getLogger(__name__)

# Updates in flight at once (one per endpoint and interval): beyond it a poll skips its update
# rather than queueing work behind a stalled broker; the next poll after the interval retries.
MAX_IN_FLIGHT = 1000
_FIELDS = ("account_id", "hostname", "platform", "enrolled_at")


class AgentRegistrations(Protocol):
    """The enrolled agent's registration as the enforcer keeps it (no last_seen)."""

    async def registration(self, endpoint_id: str) -> EndpointRegistered | None: ...


class SeenGate(Protocol):
    """Lets one caller per endpoint and interval through."""

    async def first_in_interval(self, endpoint_id: str, interval_s: int) -> bool: ...

    async def reopen(self, endpoint_id: str) -> None: ...


Publish = Callable[[EndpointRegistered], Awaitable[None]]


class RedisSeenGate:
    """``SET NX EX`` on ``enforcer:{enfNN}:last-seen:<endpoint>`` (the endpoint's slot)."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    def _key(self, endpoint_id: str) -> str:
        return self._keys("enforcer", slot_tag("enf", endpoint_id), "last-seen", endpoint_id)

    async def first_in_interval(self, endpoint_id: str, interval_s: int) -> bool:
        return bool(await self._redis.set(self._key(endpoint_id), b"1", nx=True, ex=interval_s))

    async def reopen(self, endpoint_id: str) -> None:
        await self._redis.delete(self._key(endpoint_id))


class RedisAgentRegistrations:
    """Reads the agent hash the enrollment wrote (``enforcer:agent:{enfNN}:<endpoint>``)."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def registration(self, endpoint_id: str) -> EndpointRegistered | None:
        values = await self._redis.hmget(EnforcerKeys(self._keys).agent(endpoint_id), _FIELDS)
        if any(v is None for v in values):
            return None
        account_id, hostname, platform, enrolled_at = (
            v.decode() if isinstance(v, bytes) else str(v) for v in values
        )
        try:
            return EndpointRegistered(
                endpoint_id=endpoint_id,
                account_id=account_id,
                hostname=hostname,
                platform=platform,
                enrolled_at=datetime.fromisoformat(enrolled_at),
            )
        except (ValidationError, ValueError):
            log.warning(
                "agent record unreadable; last_seen not published",
                extra={"endpoint_id": endpoint_id},
            )
            return None


class Presence:
    """Publishes ``last_seen`` for polling agents, at most once per interval per endpoint."""

    def __init__(
        self,
        gate: SeenGate,
        registrations: AgentRegistrations,
        publish: Publish,
        interval_s: int,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._gate = gate
        self._registrations = registrations
        self._publish = publish
        self._interval_s = interval_s
        self._clock = clock
        self._in_flight: set[asyncio.Task[bool]] = set()

    async def seen(self, endpoint_id: str) -> bool:
        """Publish the registration with ``last_seen = now`` unless done within the interval."""
        if not await self._gate.first_in_interval(endpoint_id, self._interval_s):
            return False
        try:
            registration = await self._registrations.registration(endpoint_id)
            if registration is None:
                return False
            await self._publish(registration.model_copy(update={"last_seen": self._clock()}))
        except BaseException:
            # The interval is free again: the next poll publishes instead of waiting it out.
            await self._gate.reopen(endpoint_id)
            raise
        return True

    def note_poll(self, endpoint_id: str) -> None:
        """Start ``seen`` beside the caller; never raises, never waits."""
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            return
        task = asyncio.get_running_loop().create_task(self._quietly(endpoint_id))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _quietly(self, endpoint_id: str) -> bool:
        try:
            return await self.seen(endpoint_id)
        except (RedisError, KafkaError, OSError, TimeoutError) as exc:
            log.warning("last_seen not published: %r", exc, extra={"endpoint_id": endpoint_id})
            return False

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for updates in flight (shutdown), cancelling what is left after ``timeout``."""
        if not self._in_flight:
            return
        pending = set(self._in_flight)
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()


def note_poll(request: Request, endpoint_id: str) -> None:
    """The long-poll route's one line: mark ``endpoint_id`` seen (no-op when not wired)."""
    presence = getattr(request.app.state, "presence", None)
    if isinstance(presence, Presence):
        presence.note_poll(endpoint_id)
