"""Last seen: an agent's long poll republishes its registration with ``last_seen``, throttled.

``endpoints.v1`` is compacted by endpoint, so each update carries the full registration. One
update per endpoint per ``HOSTISO_LAST_SEEN_INTERVAL_S`` at most: a ``SET NX EX`` on a key of
the endpoint's own slot decides which poll (of any enforcer instance) publishes. Presence never
delays or fails a poll: the update runs beside it, and a failed publish frees the interval so
the next poll tries again.

Each instance remembers until when it knows an endpoint's interval is taken (the claim answers
the key's remaining time), and asks Redis again only after that: a poll inside the interval
costs no Redis command and no task. That memory only ever skips a claim Redis would refuse; the
one case it skips one Redis would grant is an interval freed early by another instance's failed
publish, and then that instance's next poll (or this one's, once the interval ends) publishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from aiokafka.errors import KafkaError
from fastapi import Request
from pydantic import ValidationError
from redis.exceptions import RedisError

from services.enforcer.adapters.redis_store import EnforcerKeys, RedisScript
from shared.messages import EndpointRegistered, utcnow
from shared.redis import Keys, RedisClient, slot_tag

log = logging.getLogger(__name__)

# Updates in flight at once (one per endpoint and interval): beyond it a poll skips its update
# rather than queueing work behind a stalled broker; the next poll after the interval retries.
MAX_IN_FLIGHT = 1000
# Endpoints whose taken interval an instance remembers; past this, expired entries are dropped
# (and if none has expired, the memory starts over: it only saves Redis commands).
MAX_REMEMBERED = 100_000
_FIELDS = ("account_id", "hostname", "platform", "enrolled_at")


class AgentRegistrations(Protocol):
    """The enrolled agent's registration as the enforcer keeps it (no last_seen)."""

    async def registration(self, endpoint_id: str) -> EndpointRegistered | None: ...


class SeenGate(Protocol):
    """Lets one caller per endpoint and interval through."""

    async def claim(self, endpoint_id: str, interval_s: int) -> float:
        """0 if this caller takes the interval; else the seconds the taken one still runs."""
        ...

    async def reopen(self, endpoint_id: str) -> None: ...


Publish = Callable[[EndpointRegistered], Awaitable[None]]


# SET NX EX, and when the interval is already taken, how long it still runs (one key, one slot).
_CLAIM = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
return redis.call('PTTL', KEYS[1])
"""


class RedisSeenGate:
    """``SET NX EX`` on ``enforcer:{enfNN}:last-seen:<endpoint>`` (the endpoint's slot)."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._claim = RedisScript(redis, _CLAIM)

    def _key(self, endpoint_id: str) -> str:
        return self._keys("enforcer", slot_tag("enf", endpoint_id), "last-seen", endpoint_id)

    async def claim(self, endpoint_id: str, interval_s: int) -> float:
        remaining_ms = int(await self._claim([self._key(endpoint_id)], [interval_s]))
        if remaining_ms == 0:
            return 0.0
        # -1 (no expiry) or -2 (expired between the two calls) cannot be trusted: ask next time.
        return max(0.0, remaining_ms / 1000)

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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gate = gate
        self._registrations = registrations
        self._publish = publish
        self._interval_s = interval_s
        self._clock = clock
        self._monotonic = monotonic
        self._in_flight: set[asyncio.Task[bool]] = set()
        # endpoint id -> monotonic time until which its interval is known to be taken.
        self._taken_until: dict[str, float] = {}

    @property
    def updates_in_flight(self) -> int:
        return len(self._in_flight)

    def known_taken(self, endpoint_id: str) -> bool:
        """Whether this instance knows the endpoint's current interval is taken already."""
        until = self._taken_until.get(endpoint_id)
        if until is None:
            return False
        if until > self._monotonic():
            return True
        del self._taken_until[endpoint_id]
        return False

    def _remember_taken(self, endpoint_id: str, seconds: float) -> None:
        now = self._monotonic()
        if len(self._taken_until) >= MAX_REMEMBERED:
            self._taken_until = {e: t for e, t in self._taken_until.items() if t > now}
            if len(self._taken_until) >= MAX_REMEMBERED:
                self._taken_until.clear()
        self._taken_until[endpoint_id] = now + seconds

    async def seen(self, endpoint_id: str) -> bool:
        """Publish the registration with ``last_seen = now`` unless done within the interval."""
        if self.known_taken(endpoint_id):
            return False
        remaining = await self._gate.claim(endpoint_id, self._interval_s)
        if remaining > 0:
            self._remember_taken(endpoint_id, remaining)
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
        self._remember_taken(endpoint_id, self._interval_s)
        return True

    def note_poll(self, endpoint_id: str) -> None:
        """Start ``seen`` beside the caller; never raises, never waits."""
        if self.known_taken(endpoint_id) or len(self._in_flight) >= MAX_IN_FLIGHT:
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
    note_poll_of(request.app, endpoint_id)


def note_poll_of(app: Any, endpoint_id: str) -> None:
    """``note_poll`` for the app itself (the fast poll route has no ``Request``)."""
    presence = getattr(app.state, "presence", None)
    if isinstance(presence, Presence):
        presence.note_poll(endpoint_id)
