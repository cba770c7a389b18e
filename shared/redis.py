"""Redis helpers: the client factory and a key namespace (``HOSTISO_REDIS_PREFIX``)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

CLUSTER_SCHEME = "redis+cluster://"


def make_redis(url: str, *, max_connections: int = 64, pool_timeout_s: float = 5.0) -> Redis:
    """A client with a bounded pool; callers decode the bytes they read.

    The default pool opens one connection per concurrent command, so a burst (thousands of
    long-polling agents, a hot consumer) can exhaust Redis' or the OS's limits; a blocking pool
    makes such bursts queue for a connection instead.
    """
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout_s, health_check_interval=30
    )
    return Redis(connection_pool=pool, decode_responses=False)


def is_cluster_url(url: str) -> bool:
    """``redis+cluster://host:port`` (or ``rediss+cluster://``) names a Redis Cluster."""
    return url.startswith((CLUSTER_SCHEME, "rediss+cluster://"))


def make_redis_cluster(url: str, *, max_connections: int = 64) -> RedisCluster:
    """A Redis Cluster client bootstrapped from any node of ``url``; it discovers the rest.

    Scripts must keep every key in one hash slot (the cluster refuses CROSSSLOT scripts), and
    redis-py reloads a script on a node that answers NOSCRIPT (e.g. a promoted replica).
    """
    plain = url.replace("+cluster", "", 1) if is_cluster_url(url) else url
    return RedisCluster.from_url(
        plain, max_connections=max_connections, decode_responses=False, health_check_interval=30
    )


class Keys:
    """Builds namespaced keys so several runs (or tests) can share one Redis."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)
