"""Redis helpers: the client factory and a key namespace (``HOSTISO_REDIS_PREFIX``)."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError

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


# Argument types hiredis packs exactly as redis-py's encoder does (no bool, float or memoryview).
_PACKED_AS_IS = frozenset({bytes, str, int})


class _FastCommands:
    """redis-py's asyncio connection, packing commands with hiredis instead of in Python.

    hiredis is pinned and already parses the replies. Only bytes, str and int arguments with
    the UTF-8 strict encoder, and a first argument without spaces, take that path: anything
    else is packed by redis-py. Writes stay redis-py's (``asyncio.wait_for`` per write): writing
    at once instead, without its Task, saved client CPU but spread the writes of concurrent
    commands over more of Redis' event-loop turns and cost the server more than it saved.
    """

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0] if args else None
        if (
            ((type(head) is str and " " not in head) or (type(head) is bytes and b" " not in head))
            and self.encoder.encoding == "utf-8"
            and self.encoder.encoding_errors == "strict"
            and all(type(arg) in _PACKED_AS_IS for arg in args)
        ):
            return [hiredis.pack_command(args)]
        return super().pack_command(*args)  # type: ignore[misc, no-any-return]


class FastConnection(_FastCommands, Connection):
    """A TCP connection packing commands with hiredis."""


class FastSSLConnection(_FastCommands, SSLConnection):
    """The TLS counterpart of ``FastConnection``."""


_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: FastConnection,
    SSLConnection: FastSSLConnection,
}


class BoundedConnectionPool(ConnectionPool):
    """A plain pool behind a semaphore: at most ``max_connections`` connections, and a command
    beyond that waits up to ``timeout`` seconds for one (then ConnectionError, as redis-py's
    BlockingConnectionPool answers), without that pool's per-command Condition and timer.

    Only a command that finds every connection taken arms a timer.
    """

    def __init__(self, *, timeout: float | None = 20.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self._slots = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout(self.timeout):
                    await slots.acquire()
            except TimeoutError as err:
                raise RedisConnectionError("No connection available.") from err
        else:
            await slots.acquire()  # free: returns at once
        try:
            # Never beyond the bound here, so the plain pool never raises MaxConnectionsError.
            return await super().get_connection()  # type: ignore[no-untyped-call]
        except BaseException:
            # The plain pool released the connection it took, if it took one; the slot is ours.
            slots.release()
            raise

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            self._slots.release()


def make_redis(
    url: str,
    *,
    max_connections: int = 64,
    pool_timeout_s: float = 5.0,
    ca_file: str | None = None,
) -> Redis:
    """A client with a bounded pool; callers decode the bytes they read.

    The default pool opens one connection per concurrent command, so a burst (thousands of
    long-polling agents, a hot consumer) can exhaust Redis' or the OS's limits; the bounded
    pool makes such bursts queue for a connection instead (``BoundedConnectionPool``).
    """
    options = parse_url(url)  # what from_url would pass on (rediss:// names SSLConnection)
    plain = options.pop("connection_class", Connection)
    pool = BoundedConnectionPool(
        connection_class=_FAST.get(plain, plain),
        max_connections=max_connections,
        timeout=pool_timeout_s,
        health_check_interval=30,
        **redis_tls_options(url, ca_file),
        **options,
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
    client = RedisCluster.from_url(
        plain,
        max_connections=max_connections,
        decode_responses=False,
        health_check_interval=30,
        **redis_tls_options(url, ca_file),
    )
    use_fast_connections(client)
    return client


def use_fast_connections(client: RedisCluster) -> None:
    """Make every node connection of ``client`` a ``FastConnection`` (or its TLS counterpart).

    redis-py's cluster client has no connection-class option: it builds every node, the
    startup nodes and those it discovers, from its nodes manager's connection keywords. Called
    before the client connects, so no connection of the plain class exists yet.
    """
    kwargs = client.nodes_manager.connection_kwargs
    fast = _FAST.get(kwargs.get("connection_class", Connection))
    if fast is None:
        return
    kwargs["connection_class"] = fast
    for node in client.nodes_manager.startup_nodes.values():
        if not node._connections:
            node.connection_class = fast  # type: ignore[assignment]


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
