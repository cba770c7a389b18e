"""Redis helpers: the client factory and a key namespace (``HOSTISO_REDIS_PREFIX``)."""

from __future__ import annotations

import zlib
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

CLUSTER_SCHEME = "redis+cluster://"

# Either client: every store uses only commands both have, and keeps each script in one slot.
RedisClient = Redis | RedisCluster

# Keys are grouped into this many hash-tag buckets per kind. A script touches only keys of one
# bucket (one Redis Cluster slot); account-wide reads gather the account's keys from every
# bucket. Fixed for a deployment: changing it moves keys.
SLOT_BUCKETS = 64


def bucket_of(value: str, buckets: int = SLOT_BUCKETS) -> int:
    """The bucket of an id (CRC-32, stable across processes and languages)."""
    return zlib.crc32(value.encode()) % buckets


def slot_tag(kind: str, value: str) -> str:
    """The hash tag that puts every key of ``value`` (an endpoint, an account) in one slot."""
    return "{" + f"{kind}{bucket_of(value):02d}" + "}"


def bucket_tags(kind: str, buckets: int = SLOT_BUCKETS) -> list[str]:
    """Every hash tag of ``kind``, for reads that gather one account's keys from all buckets."""
    return ["{" + f"{kind}{bucket:02d}" + "}" for bucket in range(buckets)]


def redis_tls_options(url: str, ca_file: str | None) -> dict[str, Any]:
    """Connection keywords for ``url``: with ``rediss://``, verify the server against ``ca_file``.

    Credentials travel in the URL (``rediss://user:password@host:port/0``): redis-py sends them
    with AUTH on every new connection.
    """
    if not url.startswith(("rediss://", "rediss+cluster://")):
        return {}
    return {"ssl_ca_certs": ca_file, "ssl_cert_reqs": "required", "ssl_check_hostname": True}


def make_redis(
    url: str,
    *,
    max_connections: int = 64,
    pool_timeout_s: float = 5.0,
    ca_file: str | None = None,
) -> Redis:
    """A client with a bounded pool; callers decode the bytes they read.

    The default pool opens one connection per concurrent command, so a burst (thousands of
    long-polling agents, a hot consumer) can exhaust Redis' or the OS's limits; a blocking pool
    makes such bursts queue for a connection instead.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        health_check_interval=30,
        **redis_tls_options(url, ca_file),
    )
    return Redis(connection_pool=pool, decode_responses=False)


def is_cluster_url(url: str) -> bool:
    """``redis+cluster://host:port`` (or ``rediss+cluster://``) names a Redis Cluster."""
    return url.startswith((CLUSTER_SCHEME, "rediss+cluster://"))


def make_redis_cluster(
    url: str, *, max_connections: int = 64, ca_file: str | None = None
) -> RedisCluster:
    """A Redis Cluster client bootstrapped from any node of ``url``; it discovers the rest.

    Scripts must keep every key in one hash slot (the cluster refuses CROSSSLOT scripts), and
    redis-py reloads a script on a node that answers NOSCRIPT (e.g. a promoted replica).
    """
    plain = url.replace("+cluster", "", 1) if is_cluster_url(url) else url
    return RedisCluster.from_url(
        plain,
        max_connections=max_connections,
        decode_responses=False,
        health_check_interval=30,
        **redis_tls_options(url, ca_file),
    )


def make_redis_client(
    url: str, *, cluster: bool = False, max_connections: int = 64, ca_file: str | None = None
) -> RedisClient:
    """A Redis Cluster client for ``redis+cluster://`` URLs (or ``cluster``), else a plain one."""
    if cluster or is_cluster_url(url):
        return make_redis_cluster(url, max_connections=max_connections, ca_file=ca_file)
    return make_redis(url, max_connections=max_connections, ca_file=ca_file)


class Keys:
    """Builds namespaced keys so several runs (or tests) can share one Redis."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)
