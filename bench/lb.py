"""A round-robin TCP balancer in front of a service's instances, as a deployment's load balancer.

Each accepted connection goes to the next backend that accepts it; a backend that refuses (killed,
not started yet) is skipped. Connections are not moved: when an instance dies, its clients see
their connection break and reconnect, which lands them on a live instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0


class RoundRobinBalancer:
    """Listens on 127.0.0.1 and forwards every connection to one of ``backends`` (ports)."""

    def __init__(self, name: str, backends: list[int] | None = None) -> None:
        self.name = name
        self.backends: list[int] = list(backends or [])
        self._next = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.refused = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RoundRobinBalancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=1024)
        return self

    def set_backends(self, ports: list[int]) -> None:
        self.backends = list(ports)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            if not self.backends:
                break
            port = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                continue
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream = await self._connect()
        if upstream is None:
            self.refused += 1
            writer.close()
            return
        up_reader, up_writer = upstream
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except asyncio.CancelledError:
            # close(): the balancer goes away with the stack; both sides are closed below.
            pass
        finally:
            self._pipes.discard(task)
            for side in (writer, up_writer):
                with contextlib.suppress(OSError, RuntimeError):
                    side.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._pipes):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            sink.close()
