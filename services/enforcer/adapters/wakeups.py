"""Wakes agents waiting on this process when any instance stores a policy (sharded pub/sub)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from shared.redis import is_cluster_url, make_redis_cluster, redis_tls_options

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


class _Resubscribe(Exception):
    """A shard dropped our subscription (its slot moved): subscribe again where it lives now."""


def _node_url(url: str, host: str, port: int) -> str:
    """``url`` (credentials, TLS, db) pointed at one cluster node, as a plain Redis URL."""
    parts = urlsplit(url.replace("+cluster", "", 1) if is_cluster_url(url) else url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}"))


class RedisPolicyWakeups:
    """Per-bucket wake channels (sharded pub/sub) fanned out to in-process waiters.

    Every store publishes on its endpoint's bucket channel (``SPUBLISH`` in the store script, so
    on a Redis Cluster the message stays on the shard that owns the bucket). This process holds
    one subscriber connection per shard, subscribed to the channels that shard owns (on a single
    Redis: one connection, every channel). Waiters are plain asyncio events keyed by endpoint,
    so thousands of waiting agents cost no Redis connection each. If any link drops, or a shard
    gives up a channel (its slot moved), every link is rebuilt from the current topology and
    every waiter is woken once they are back: a policy published while we were deaf is then
    found by the waiter's own re-check.
    """

    def __init__(self, redis_url: str, channels: list[str], *, ca_file: str | None = None) -> None:
        self._redis_url = redis_url
        self._ca_file = ca_file
        self._channels = list(channels)
        self._waiters: dict[str, set[PolicyWaiter]] = {}
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self._cluster: RedisCluster | None = None
        self.subscribed = asyncio.Event()
        self.wakeups_received = 0
        self.shards = 0
        self.subscriptions = 0  # times every shard link was (re)built
        self._draining = False

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

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Shutting down: every waiting poll answers now (after one more check) and no new poll
        waits, so the server's graceful shutdown ends them with answers instead of cancelling
        them (a cancelled poll is a cut connection and a traceback in the log)."""
        self._draining = True
        self.wake_all()

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
        if self._cluster is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._cluster.aclose()
            self._cluster = None

    async def _shards(self) -> list[tuple[str, list[str]]]:
        """(node URL, the channels that node serves) for every shard holding one of ours."""
        if not is_cluster_url(self._redis_url):
            return [(self._redis_url, self._channels)]
        if self._cluster is None:
            self._cluster = make_redis_cluster(self._redis_url, ca_file=self._ca_file)
            await self._cluster.initialize()
        else:
            await self._cluster.nodes_manager.initialize()
        by_node: dict[tuple[str, int], list[str]] = {}
        for channel in self._channels:
            node = self._cluster.get_node_from_key(channel)
            if node is None:
                raise _Resubscribe(f"no node serves the slot of {channel!r} yet")
            by_node.setdefault((str(node.host), int(node.port)), []).append(channel)
        return [
            (_node_url(self._redis_url, host, port), channels)
            for (host, port), channels in sorted(by_node.items())
        ]

    async def _listen_forever(self) -> None:
        delay = 0.2
        while True:
            tasks: list[asyncio.Task[None]] = []
            try:
                shards = await self._shards()
                ready = [asyncio.Event() for _ in shards]
                tasks = [
                    asyncio.create_task(self._listen_shard(url, channels, event))
                    for (url, channels), event in zip(shards, ready, strict=True)
                ]
                all_ready = asyncio.create_task(_all_set(ready))
                tasks.append(all_ready)
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if all_ready in done:
                    self.shards = len(shards)
                    self.subscriptions += 1
                    self.subscribed.set()
                    self.wake_all()
                    delay = 0.2
                    done, _ = await asyncio.wait(tasks[:-1], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            except (RedisError, RedisClusterException, OSError, _Resubscribe) as exc:
                self.subscribed.clear()
                log.warning("policy wake-up subscription lost; resubscribing: %r", exc)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                        await task
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _listen_shard(self, url: str, channels: list[str], ready: asyncio.Event) -> None:
        # No silent client-side retries: a broken link must surface here so we resync waiters.
        client = Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=10,
            **redis_tls_options(url, self._ca_file),
        )
        pubsub = client.pubsub()
        try:
            for channel in channels:
                # One channel per SSUBSCRIBE: a node refuses channels of several slots at once.
                await pubsub.ssubscribe(channel)
            ready.set()
            task = asyncio.current_task()
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if task is not None and task.cancelling():
                    # On Python 3.11 redis-py's timeout can swallow a cancel that lands inside
                    # get_message: honour it, or a resync waits on this link for ever.
                    raise asyncio.CancelledError
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "smessage":
                    self._dispatch(message["data"])
                elif kind == "sunsubscribe":
                    raise _Resubscribe(f"{url} gave up channel {message.get('channel')!r}")
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def _dispatch(self, data: bytes) -> None:
        """One message of a store script: an ``<endpoint> <sequence>`` line per policy stored
        (every endpoint of one bucket that a lane batch stored)."""
        self.wakeups_received += 1
        waiters = self._waiters
        for line in data.decode("utf-8", "replace").split("\n"):
            endpoint_id, _, _sequence = line.partition(" ")
            if endpoint_id in waiters:
                self.notify(endpoint_id)


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()
