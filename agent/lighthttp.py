"""A light HTTP/1.1 client for simulated agents (``python -m agent --simulated --count N``).

Thousands of simulated agents share one event loop; httpx costs about a millisecond of CPU per
request, more than the enforcer spends answering it. This client does only what the agent API
needs: one keep-alive connection per request in flight, the compiled ``httptools`` parser,
``Content-Length`` or chunked bodies, gzip answers (the enforcer stores a policy gzipped and
sends those bytes as they are), one TLS context and one resolved address shared by every agent
of the process. Its errors are httpx's, so :class:`agent.client.EnforcerClient` treats them as it
treats httpx's. The real agent keeps httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import zlib
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

import httptools
import httpx
import orjson

# An agent has at most a poll and a report in flight (see agent.bootstrap.AGENT_POOL_LIMITS).
MAX_IDLE_CONNECTIONS = 2
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
READ_CHUNK = 16 * 1024


class LightResponse:
    """The part of ``httpx.Response`` that :class:`agent.client.EnforcerClient` reads."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self, **_: Any) -> Any:
        return orjson.loads(self.content)


class _ResponseReader:
    """httptools callbacks for one response (header names lower-cased)."""

    __slots__ = ("body", "complete", "header_bytes", "headers", "last_field")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.complete = False
        self.header_bytes = 0
        self.last_field = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise httpx.RemoteProtocolError("response headers too large")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection(asyncio.Protocol):
    """One keep-alive connection: an ``asyncio.Protocol`` feeding httptools as bytes arrive,
    with TLS done here over ``ssl.MemoryBIO`` (the context's verification, as asyncio's own
    TLS does it) instead of asyncio's ``SSLProtocol``, whose 256 KiB read buffer per
    connection was 94 % of an idle simulated agent's memory, and without ``StreamReader``'s
    future per read and ``drain`` per write."""

    def __init__(self, tls: ssl.SSLContext | None, hostname: str) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._tls: ssl.SSLObject | None = None
        if tls is not None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = tls.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._handshaken = self._tls is None
        self._handshake: asyncio.Future[None] | None = (
            None if self._tls is None else loop.create_future()
        )
        self._ended = False
        # The answer being read: its callbacks, parser, bytes so far and the waiter.
        self._answer: _ResponseReader | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._received = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def usable(self) -> bool:
        return (
            not self._ended
            and self._answer is None
            and self.transport is not None
            and not self.transport.is_closing()
        )

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport: no isinstance).
        self.transport = cast(asyncio.Transport, transport)
        if self._tls is not None:
            self._step_handshake()

    def data_received(self, data: bytes) -> None:
        if self._tls is None:
            self._feed(data)
            return
        assert self._incoming is not None
        self._incoming.write(data)
        if not self._handshaken:
            self._step_handshake()
            if not self._handshaken:
                return
        while not self._ended:
            try:
                chunk = self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the peer ends the connection
                self._end(None)
                break
            except ssl.SSLError as exc:
                self._fail(httpx.ReadError(repr(exc)))
                break
            if not chunk:
                self._end(None)
                break
            self._feed(chunk)
        self._flush()  # e.g. TLS 1.3 key updates

    def eof_received(self) -> bool | None:
        self._end(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    # --- TLS ----------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing is not None and self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    def _step_handshake(self) -> None:
        assert self._tls is not None and self._handshake is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            if not self._handshake.done():
                self._handshake.set_exception(exc)
            self.close()
            return
        self._flush()
        self._handshaken = True
        if not self._handshake.done():
            self._handshake.set_result(None)

    async def handshaken(self) -> None:
        if self._handshake is not None:
            await self._handshake

    # --- one exchange -------------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        parser, answer = self._parser, self._answer
        if parser is None or answer is None:
            # Bytes nobody asked for (after an answer, on an idle connection): not reusable.
            self._ended = True
            self.close()
            return
        self._received += len(chunk)
        if self._received > MAX_BODY_BYTES + MAX_HEADER_BYTES:
            self._fail(httpx.RemoteProtocolError("response too large"))
            return
        try:
            parser.feed_data(chunk)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"unparsable response: {exc}"))
            return
        if answer.complete:
            self._answer = self._parser = None
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._ended = True
        self._answer = self._parser = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def _end(self, exc: Exception | None) -> None:
        """The connection ended (EOF, close_notify, reset): the answer being read, if any, fails."""
        self._ended = True
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionResetError("closed in the handshake"))
        if self._answer is not None:
            if self._received == 0 and (exc is None or isinstance(exc, _STALE_ERRORS)):
                error: BaseException = _StaleConnectionError()
            elif exc is None:
                error = httpx.RemoteProtocolError("connection closed mid-response")
            else:
                error = httpx.ReadError(repr(exc))
            self._fail(error)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def exchange(
        self, payload: bytes, answer: _ResponseReader, parser: httptools.HttpResponseParser
    ) -> asyncio.Future[None]:
        """Sends ``payload``; the future is done when ``answer`` is complete (or has the error)."""
        self._answer, self._parser, self._received = answer, parser, 0
        self._waiter = waiter = self._loop.create_future()
        if self._ended or self.transport is None or self.transport.is_closing():
            self._end(None)
            return waiter
        try:
            if self._tls is not None:
                self._tls.write(payload)
                self._flush()
            else:
                self.transport.write(payload)
        except (ConnectionResetError, BrokenPipeError) as exc:
            self._end(exc)
        except (ssl.SSLError, OSError) as exc:
            self._fail(httpx.WriteError(repr(exc)))
        return waiter

    def close(self) -> None:
        self._ended = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._tls is not None and self._handshaken:
            with contextlib.suppress(ssl.SSLError, OSError):
                self._tls.unwrap()  # queues our close_notify (and wants the peer's: not waited)
            self._flush()
        transport.close()


# Ends of a connection before any byte of the answer that mean "the server closed it while idle".
_STALE_ERRORS = (ConnectionResetError, BrokenPipeError)


# Characters ``urlencode`` (``quote_plus``) never escapes: a key or value made only of them goes
# as it is, so the poll's ``after=…&wait=…`` skips urllib (a quarter of an idle poll's CPU).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def encode_query(params: Mapping[str, int | float | str]) -> str:
    """``urlencode(params)``, exactly, without urllib for plain keys and numbers."""
    parts = []
    for key, value in params.items():
        name, text = str(key), str(value)
        if _UNRESERVED.issuperset(name) and _UNRESERVED.issuperset(text):
            parts.append(f"{name}={text}")
        else:
            parts.append(urlencode({key: value}))
    return "&".join(parts)


def encode_request(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    body: bytes | None,
) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive, gzip accepted)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: gzip"]
    for name, value in headers.items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise httpx.LocalProtocolError(f"header {name!r}: CR/LF not allowed")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


def decode_body(headers: Mapping[str, str], body: bytes) -> bytes:
    """Undo a ``Content-Encoding: gzip`` (the only coding we ask for)."""
    coding = headers.get("content-encoding", "identity").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding != "gzip":
        raise httpx.DecodingError(f"unexpected Content-Encoding {coding!r}")
    try:
        inflater = zlib.decompressobj(wbits=31)
        out = inflater.decompress(body, MAX_BODY_BYTES)
    except zlib.error as exc:
        raise httpx.DecodingError(f"gzip body: {exc}") from exc
    if inflater.unconsumed_tail:
        raise httpx.DecodingError("gzip body larger than the limit")
    return out


class LightHttpClient:
    """One agent's client of one origin (scheme, host and port of ``base_url``).

    ``request`` has the keyword arguments of ``httpx.AsyncClient.request`` that the agent
    uses; the URL must be on the client's origin.
    """

    def __init__(self, base_url: str, tls: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"light client: unsupported URL {base_url!r}")
        self.scheme = parts.scheme
        self.hostname = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host_header = parts.netloc
        self.tls = tls if parts.scheme == "https" else None
        self._idle: list[_Connection] = []
        self._closed = False

    async def _connect(self) -> _Connection:
        connection = _Connection(self.tls, self.hostname)
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: connection, self.hostname, self.port
            )
            await connection.handshaken()
        except (OSError, ssl.SSLError) as exc:
            connection.close()
            raise httpx.ConnectError(f"{self.origin}: {exc!r}") from exc
        except BaseException:
            connection.close()
            raise
        return connection

    def _checkout(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection, keep: bool) -> None:
        if keep and not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
            self._idle.append(connection)
        else:
            connection.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        json: Any = None,
        params: Mapping[str, int | float | str] | None = None,
    ) -> LightResponse:
        if self._closed:
            raise httpx.ConnectError("light client closed")
        if not url.startswith(self.origin + "/"):
            raise httpx.UnsupportedProtocol(f"{url!r} is not on {self.origin}")
        target = url[len(self.origin) :]
        if params:
            target += ("&" if "?" in target else "?") + encode_query(params)
        body = orjson.dumps(json) if json is not None else None
        payload = encode_request(method, target, self.host_header, headers or {}, body)
        try:
            async with asyncio.timeout(timeout):
                reused = self._checkout()
                if reused is not None:
                    try:
                        return await self._exchange(reused, payload, method)
                    except _StaleConnectionError:
                        pass  # the server closed it while idle: once more on a new connection
                return await self._exchange(await self._connect(), payload, method)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"{method} {target}: no answer within {timeout} s") from exc
        except _StaleConnectionError as exc:
            raise httpx.RemoteProtocolError(f"{method} {target}: connection closed") from exc

    async def _exchange(
        self, connection: _Connection, payload: bytes, method: str
    ) -> LightResponse:
        keep = False
        try:
            response = await self._send_and_read(connection, payload, method)
            keep = response.headers.get("connection", "").lower() != "close"
            return response
        finally:
            self._release(connection, keep)

    async def _send_and_read(
        self, connection: _Connection, payload: bytes, method: str
    ) -> LightResponse:
        answer = _ResponseReader()
        parser = httptools.HttpResponseParser(answer)
        await connection.exchange(payload, answer, parser)
        status = parser.get_status_code()
        content = decode_body(answer.headers, b"".join(answer.body))
        # (httptools' should_keep_alive() is False once the message is complete: decide here.)
        if parser.get_http_version() != "1.1":
            answer.headers["connection"] = "close"
        return LightResponse(status, answer.headers, content)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class _StaleConnectionError(Exception):
    """The connection ended before any byte of the answer (a kept-alive socket the server closed)."""
