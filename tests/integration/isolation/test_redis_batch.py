"""The Redis batcher on the real Redis: one pipeline per turn, each caller its own reply or error."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.isolation.adapters.redis_batch import BatchScript, RedisBatcher


async def test_commands_issued_together_share_a_pipeline_and_keep_their_own_results(
    redis: Redis, redis_prefix: str
) -> None:
    batcher = RedisBatcher(redis)
    key = f"{redis_prefix}batch"
    await redis.set(f"{key}:list", b"x")
    await redis.lpush(f"{key}:wrongtype", b"x")
    replies = await asyncio.gather(
        *(batcher.command("SET", f"{key}:{i}", str(i).encode()) for i in range(100)),
        batcher.command("GET", f"{key}:list"),
        batcher.command("GET", f"{key}:wrongtype"),  # fails alone: WRONGTYPE
        batcher.command("GET", f"{key}:missing"),
        return_exceptions=True,
    )
    assert replies[:100] == [True] * 100
    assert replies[100] == b"x"
    assert isinstance(replies[101], ResponseError)
    assert replies[102] is None
    assert await redis.get(f"{key}:99") == b"99"


async def test_a_script_redis_forgot_is_loaded_again(redis: Redis, redis_prefix: str) -> None:
    batcher = RedisBatcher(redis)
    script = BatchScript("return redis.call('INCR', KEYS[1])")
    key = f"{redis_prefix}counter"
    assert await batcher.script(script, [key], []) == 1
    await redis.script_flush()
    assert await batcher.script(script, [key], []) == 2


async def test_callers_meeting_an_unloaded_script_together_load_it_once(
    redis: Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = RedisBatcher(redis)
    script = BatchScript("return redis.call('INCR', KEYS[1]) -- first run of this script")
    await redis.script_flush()
    loads = 0
    load = redis.script_load

    async def counted(source: str) -> str:
        nonlocal loads
        loads += 1
        return await load(source)

    monkeypatch.setattr(redis, "script_load", counted)
    key = f"{redis_prefix}counter"
    replies = await asyncio.gather(*(batcher.script(script, [key], []) for _ in range(50)))
    assert sorted(replies) == list(range(1, 51))
    assert loads == 1
