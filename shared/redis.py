"""Redis helpers: the client factory and a key namespace (``HOSTISO_REDIS_PREFIX``)."""

from __future__ import annotations

from redis.asyncio import Redis


def make_redis(url: str) -> Redis:
    """A client that returns bytes; callers decode what they read."""
    return Redis.from_url(url, decode_responses=False, health_check_interval=30)


class Keys:
    """Builds namespaced keys so several runs (or tests) can share one Redis."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)
