"""Redis helpers: the client factory and a key namespace (``HOSTISO_REDIS_PREFIX``)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis


def redis_tls_options(url: str, ca_file: str | None) -> dict[str, Any]:
    """Connection keywords for ``url``: with ``rediss://``, verify the server against ``ca_file``.

    Credentials travel in the URL (``rediss://user:password@host:port/0``): redis-py sends them
    with AUTH on every new connection.
    """
    if not url.startswith("rediss://"):
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


class Keys:
    """Builds namespaced keys so several runs (or tests) can share one Redis."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)
