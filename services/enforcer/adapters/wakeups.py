"""Wakes agents waiting on this process when any instance stores a policy (one Redis pub/sub link)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.redis import redis_tls_options

log = logging.getLogger(__name__)


class PolicyWaiter:
    """One waiting long-poll: an event the hub sets when its endpoint gets a policy."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def arm(self) -> None:
        self._event.clear()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class RedisPolicyWakeups:
    """One subscriber connection per process fanning wake-ups out to in-process waiters.

    Waiters are plain asyncio events keyed by endpoint, so thousands of waiting agents cost
    no Redis connection each. If the subscription drops, every waiter is woken once it is back:
    a policy published while we were deaf is then found by the waiter's own re-read.
    """

    def __init__(self, redis_url: str, channel: str, *, ca_file: str | None = None) -> None:
        self._redis_url = redis_url
        self._ca_file = ca_file
        self._channel = channel
        self._waiters: dict[str, set[PolicyWaiter]] = {}
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self.wakeups_received = 0

    @property
    def waiting_count(self) -> int:
        return self._count

    @contextlib.contextmanager
    def waiter(self, endpoint_id: str) -> Iterator[PolicyWaiter]:
        waiter = PolicyWaiter()
        self._waiters.setdefault(endpoint_id, set()).add(waiter)
        self._count += 1
        try:
            yield waiter
        finally:
            self._count -= 1
            waiters = self._waiters.get(endpoint_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[endpoint_id]

    def notify(self, endpoint_id: str) -> None:
        for waiter in self._waiters.get(endpoint_id, ()):
            waiter.wake()

    def wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.wake()

    async def start(self, timeout: float = 60.0) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="policy-wakeups")
        async with asyncio.timeout(timeout):
            await self.subscribed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen_forever(self) -> None:
        delay = 0.2
        while True:
            # No silent client-side retries: a broken link must surface here so we resync waiters.
            client = Redis.from_url(
                self._redis_url,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=10,
                **redis_tls_options(self._redis_url, self._ca_file),
            )
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                self.wake_all()
                delay = 0.2
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("policy wake-up subscription lost; resubscribing: %r", exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _dispatch(self, data: bytes) -> None:
        self.wakeups_received += 1
        endpoint_id, _, _sequence = data.decode("utf-8", "replace").partition(" ")
        self.notify(endpoint_id)
