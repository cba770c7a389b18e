"""shared.redis's fast connection and bounded pool answer exactly what redis-py's would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from shared.redis import (
    BoundedConnectionPool,
    FastConnection,
    FastSSLConnection,
    make_redis,
    make_redis_cluster,
)

CASES: list[tuple[Any, ...]] = [
    ("EVALSHA", "a" * 40, 2, "p:{enf07}:e1", "p:{enf07}:e2", "digest", 0),
    (b"EVALSHA", b"sha", 1, b"key", -12, 10**19, b"\x00\xff binary"),
    ("GET", "clé-ünïcode"),
    ("SET", "k", b"v" * 200_000),  # above redis-py's chunking cutoff
    ("SCRIPT LOAD", "return 1"),  # a first argument with a space: redis-py splits it
    (b"CLIENT SETNAME", b"x"),
    ("SET", "k", 1.5),  # floats: redis-py's encoder
    ("SET", "k", 1e20),
    ("SET", "k", memoryview(b"view")),
    ("PING",),
]


def _packed(connection: Connection, args: tuple[Any, ...]) -> bytes:
    return b"".join(bytes(chunk) for chunk in connection.pack_command(*args))


@pytest.mark.parametrize(
    "args", CASES, ids=[repr(case[0]) + str(i) for i, case in enumerate(CASES)]
)
def test_fast_packing_is_byte_for_byte_redis_pys(args: tuple[Any, ...]) -> None:
    assert _packed(FastConnection(), args) == _packed(Connection(), args)


def test_pipeline_packing_is_redis_pys() -> None:
    commands = [CASES[0], CASES[1], CASES[4]]
    fast = b"".join(bytes(c) for c in FastConnection().pack_commands(commands))
    plain = b"".join(bytes(c) for c in Connection().pack_commands(commands))
    assert fast == plain


@pytest.mark.parametrize("bad", [("SET", "k", True), ("SET", "k", None), ("SET", "k", object())])
def test_bad_arguments_fail_as_redis_pys(bad: tuple[Any, ...]) -> None:
    with pytest.raises(DataError) as plain:
        Connection().pack_command(*bad)
    with pytest.raises(DataError) as fast:
        FastConnection().pack_command(*bad)
    assert str(fast.value) == str(plain.value)


def test_unencodable_text_fails_as_redis_pys() -> None:
    with pytest.raises(UnicodeEncodeError):
        Connection().pack_command("GET", "\udcff")
    with pytest.raises(UnicodeEncodeError):
        FastConnection().pack_command("GET", "\udcff")


def test_other_encodings_take_redis_pys_packing() -> None:
    args = ("SET", "k", "é")
    fast = FastConnection(encoding="latin-1")
    assert _packed(fast, args) == _packed(Connection(encoding="latin-1"), args)


def test_make_redis_uses_the_fast_classes_and_the_bounded_pool() -> None:
    plain = make_redis("redis://127.0.0.1:1/0", max_connections=3, pool_timeout_s=2)
    pool = plain.connection_pool
    assert isinstance(pool, BoundedConnectionPool)
    assert pool.connection_class is FastConnection
    assert (pool.max_connections, pool.timeout) == (3, 2)
    tls = make_redis("rediss://u:p@127.0.0.1:1/0", ca_file="/nonexistent/ca.pem")
    assert tls.connection_pool.connection_class is FastSSLConnection
    assert issubclass(FastSSLConnection, SSLConnection)
    kwargs = tls.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["ssl_cert_reqs"]) == (
        "u",
        "p",
        "required",
    )


class _Unconnected(Connection):
    """A connection the pool can hand out without a server (connect and can_read stubbed)."""

    fail_connect = False

    async def connect(self) -> None:
        if self.fail_connect:
            raise RedisConnectionError("refused")

    async def can_read(self) -> bool:
        return False


async def test_the_pool_bound_queues_then_times_out_like_the_blocking_pool() -> None:
    pool = BoundedConnectionPool(connection_class=_Unconnected, max_connections=2, timeout=0.05)
    first, second = await pool.get_connection(), await pool.get_connection()
    assert first is not second
    with pytest.raises(RedisConnectionError, match="No connection available"):
        await pool.get_connection()
    waiting = asyncio.create_task(pool.get_connection())
    await asyncio.sleep(0)
    assert not waiting.done()
    await pool.release(first)
    async with asyncio.timeout(5):
        assert await waiting is first
    await pool.release(second)
    await pool.release(first)
    # Every slot came back: two at once again, no more connections than the bound were made.
    again = [await pool.get_connection(), await pool.get_connection()]
    assert set(again) == {first, second}


async def test_a_connection_that_fails_to_connect_gives_its_slot_back() -> None:
    pool = BoundedConnectionPool(connection_class=_Unconnected, max_connections=1, timeout=0.05)
    _Unconnected.fail_connect = True
    try:
        for _ in range(3):
            with pytest.raises(RedisConnectionError, match="refused"):
                await pool.get_connection()
    finally:
        _Unconnected.fail_connect = False
    connection = await pool.get_connection()
    await pool.release(connection)


def test_the_cluster_client_builds_fast_connections_for_every_node() -> None:
    plain = make_redis_cluster("redis+cluster://127.0.0.1:1")
    assert plain.nodes_manager.connection_kwargs["connection_class"] is FastConnection
    nodes = plain.nodes_manager.startup_nodes.values()
    assert [n.connection_class for n in nodes] == [FastConnection]
    assert isinstance(next(iter(nodes)).acquire_connection(), FastConnection)
    tls = make_redis_cluster("rediss+cluster://127.0.0.1:1", ca_file="/nonexistent/ca.pem")
    assert tls.nodes_manager.connection_kwargs["connection_class"] is FastSSLConnection
    assert [n.connection_class for n in tls.nodes_manager.startup_nodes.values()] == [
        FastSSLConnection
    ]
