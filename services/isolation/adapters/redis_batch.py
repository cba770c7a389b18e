"""Redis commands of concurrent handlers, sent together: one pipeline per event-loop turn."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from redis.exceptions import NoScriptError

from shared.redis import RedisClient

log = logging.getLogger(__name__)

MAX_BATCH = 512


class BatchScript:
    """A Lua script run by EVALSHA through the batcher (loaded again if Redis forgot it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # SHA-1 is how Redis names scripts


class RedisBatcher:
    """Queues the commands issued during one event-loop turn and sends them as one pipeline.

    Hundreds of requests are handled concurrently and each needs a few Redis commands; sent one
    by one they cost a round trip and a pooled connection each. A non-transactional pipeline
    changes nothing in their meaning: each command (each Lua script, atomic on its own) runs as
    if sent alone, in the order issued, and every caller gets its own result or error.
    """

    def __init__(self, redis: RedisClient, max_batch: int = MAX_BATCH) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._queue: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._pipelines: set[asyncio.Task[None]] = set()
        self._loading: dict[str, asyncio.Future[Any]] = {}

    def command(self, *args: Any, **options: Any) -> asyncio.Future[Any]:
        """Queue one command; the future holds its reply (parsed as the client would)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, options, future))
        if len(self._queue) >= self._max_batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def script(self, script: BatchScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or flushed its script cache (or this is the script's first run):
            # load it once more and run it again. Every caller of the same batch meets the error
            # together; one load serves them all instead of one load (and one new connection)
            # each.
            await self._load(script)
            return await self.command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load(self, script: BatchScript) -> None:
        loading = self._loading.get(script.sha)
        if loading is None:
            loading = asyncio.ensure_future(self._redis.script_load(script.source))
            self._loading[script.sha] = loading
            loading.add_done_callback(lambda _: self._loading.pop(script.sha, None))
        await asyncio.shield(loading)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        if not queue:
            return
        task = asyncio.get_running_loop().create_task(self._execute(queue))
        # Held until done: a pipeline in flight must not be garbage-collected.
        self._pipelines.add(task)
        task.add_done_callback(self._pipelines.discard)

    async def _execute(
        self, queue: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]]
    ) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for args, options, _ in queue:
            pipe.execute_command(*args, **options)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for *_, future in queue:
                future.cancel()
            raise
        except Exception as exc:
            # Connection-level failure: every caller sees it and its record is retried.
            log.warning("redis pipeline of %d commands failed: %r", len(queue), exc)
            for *_, future in queue:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), reply in zip(queue, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
