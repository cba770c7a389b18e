"""The chaos stack's round-robin balancer: spreads connections, skips an instance that is down."""

from __future__ import annotations

import asyncio

from bench.lb import RoundRobinBalancer
from shared.infra.proc import free_port


async def _echo_server(tag: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(tag + data)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _ask(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"?")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    return answer


async def test_connections_alternate_and_a_dead_backend_is_skipped() -> None:
    first, second = await _echo_server(b"a"), await _echo_server(b"b")
    ports = [s.sockets[0].getsockname()[1] for s in (first, second)]
    dead = free_port()  # nothing listens: a killed instance
    balancer = await RoundRobinBalancer("test", [ports[0], dead, ports[1]]).start()
    try:
        answers = [await _ask(balancer.port) for _ in range(6)]
        assert sorted(set(answers)) == [b"a?", b"b?"]
        assert answers.count(b"a?") >= 2 and answers.count(b"b?") >= 2
        balancer.set_backends([dead])
        # No live backend: the client's connection is closed without an answer.
        assert await _ask(balancer.port) == b""
        assert balancer.refused == 1
    finally:
        await balancer.close()
        for server in (first, second):
            server.close()
