"""The simulated agents' light HTTP/1.1 client against a scripted local server."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from agent.client import EnforcerClient, EnforcerUnavailableError, Enrollment
from agent.lighthttp import LightHttpClient, decode_body, encode_request

Answer = Callable[[bytes], bytes | None]


class ScriptedServer:
    """Reads one request head (and body by Content-Length), answers ``answer(request)``;
    ``None`` closes the connection without answering."""

    def __init__(self, answer: Answer, close_after: int | None = None) -> None:
        self.answer = answer
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                reply = self.answer(request)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(server: ScriptedServer) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        await listener.wait_closed()


def ok(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_works_on_uvloop_the_loop_simulated_agents_run_on() -> None:
    # uvloop's transports do not subclass asyncio.Transport; `agent --simulated` runs on it.
    import uvloop

    async def exchange() -> list[int]:
        server = ScriptedServer(lambda _: ok(b'{"a": 1}'))
        async with serving(server) as url:
            client = LightHttpClient(url, None)
            codes = [(await client.request("GET", url + "/x", timeout=5)).status_code]
            codes.append((await client.request("GET", url + "/y", timeout=5)).status_code)
            await client.aclose()
            assert server.connections == 1
            return codes

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(exchange()) == [200, 200]


async def test_keeps_one_connection_alive_across_requests() -> None:
    server = ScriptedServer(lambda _: ok(b'{"a": 1}'))
    async with serving(server) as url:
        client = LightHttpClient(url, None)
        for _ in range(3):
            answer = await client.request("GET", url + "/x", headers={}, timeout=5)
            assert answer.status_code == 200
            assert answer.json() == {"a": 1}
        await client.aclose()
    assert server.connections == 1
    assert len(server.requests) == 3


async def test_sends_query_token_json_body_and_asks_for_gzip() -> None:
    server = ScriptedServer(lambda _: ok(b"", status="204 No Content"))
    async with serving(server) as url:
        client = LightHttpClient(url, None)
        answer = await client.request(
            "POST",
            url + "/v1/p",
            headers={"Authorization": "Bearer t0k"},
            timeout=5,
            json={"sequence": 3},
            params={"after": 2, "wait": 1.5},
        )
        await client.aclose()
    assert answer.status_code == 204
    (request,) = server.requests
    assert request.startswith(b"POST /v1/p?after=2&wait=1.5 HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer t0k\r\n" in request
    assert b"\r\nAccept-Encoding: gzip\r\n" in request
    assert request.endswith(b'\r\n\r\n{"sequence":3}')


async def test_inflates_a_gzip_answer() -> None:
    packed = gzip.compress(b'{"policy": "strict"}')
    server = ScriptedServer(lambda _: ok(packed, "Content-Encoding: gzip"))
    async with serving(server) as url:
        client = LightHttpClient(url, None)
        answer = await client.request("GET", url + "/p", headers={}, timeout=5)
        await client.aclose()
    assert answer.content == b'{"policy": "strict"}'


async def test_reads_a_chunked_answer() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    server = ScriptedServer(lambda _: chunked)
    async with serving(server) as url:
        client = LightHttpClient(url, None)
        answer = await client.request("GET", url + "/c", headers={}, timeout=5)
        await client.aclose()
    assert answer.text == "hello world"


async def test_retries_once_on_a_fresh_connection_when_the_idle_one_was_closed() -> None:
    server = ScriptedServer(lambda _: ok(b"1"), close_after=1)
    async with serving(server) as url:
        client = LightHttpClient(url, None)
        first = await client.request("GET", url + "/a", headers={}, timeout=5)
        # Whether or not the EOF was seen before reuse, the second request must succeed.
        second = await client.request("GET", url + "/b", headers={}, timeout=5)
        await client.aclose()
    assert (first.content, second.content) == (b"1", b"1")
    assert server.connections == 2


async def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    listener = await asyncio.start_server(mute, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    client = LightHttpClient(url, None)
    with pytest.raises(httpx.ReadTimeout):
        await client.request("GET", url + "/slow", headers={}, timeout=0.2)
    await client.aclose()
    listener.close()


async def test_connection_refused_is_an_httpx_connect_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    client = LightHttpClient(f"http://127.0.0.1:{port}", None)
    with pytest.raises(httpx.ConnectError):
        await client.request("GET", f"http://127.0.0.1:{port}/", headers={}, timeout=2)


async def test_garbage_answer_is_a_protocol_error_the_agent_retries() -> None:
    server = ScriptedServer(lambda _: b"NOT HTTP AT ALL\r\n\r\n")
    async with serving(server) as url:
        enforcer = EnforcerClient(url, LightHttpClient(url, None), allow_plain_http=True)
        with pytest.raises(EnforcerUnavailableError):
            await enforcer.poll_policy(Enrollment("a1", "t"), after=0, wait=1)


async def test_enforcer_client_reads_no_policy_from_a_204_poll() -> None:
    server = ScriptedServer(lambda _: ok(b"", status="204 No Content"))
    async with serving(server) as url:
        enforcer = EnforcerClient(url, LightHttpClient(url, None), allow_plain_http=True)
        assert await enforcer.poll_policy(Enrollment("a1", "t"), after=4, wait=1) is None
    assert server.requests[0].startswith(b"GET /v1/agents/a1/policy?after=4&wait=1 HTTP/1.1")


def test_a_header_with_crlf_is_refused_before_sending() -> None:
    with pytest.raises(httpx.LocalProtocolError):
        encode_request("GET", "/", "h", {"Authorization": "Bearer x\r\nEvil: 1"}, None)


def test_a_url_off_the_clients_origin_is_refused() -> None:
    client = LightHttpClient("http://127.0.0.1:1", None)
    with pytest.raises(httpx.UnsupportedProtocol):
        asyncio.run(client.request("GET", "http://other:1/x", headers={}, timeout=1))


def test_an_unknown_content_encoding_and_a_corrupt_gzip_are_decoding_errors() -> None:
    with pytest.raises(httpx.DecodingError):
        decode_body({"content-encoding": "br"}, b"x")
    with pytest.raises(httpx.DecodingError):
        decode_body({"content-encoding": "gzip"}, b"not gzip")
    assert decode_body({}, b"plain") == b"plain"


@pytest.mark.parametrize(
    "params",
    [
        {"after": 0, "wait": 25.0},
        {"after": 12345678901234567890, "wait": 0.5},
        {"wait": 1e20, "after": -3},  # "1e+20": the '+' is escaped
        {"wait": float("inf"), "x": float("nan")},
        {"a b": "c&d", "é": "ü", "k": ""},
        {"q": "a=b?c/d#e%f+g~h"},
        {"flag": True},
        {},
    ],
)
def test_query_fast_path_answers_exactly_what_urlencode_answers(
    params: dict[str, int | float | str],
) -> None:
    from urllib.parse import urlencode

    from agent.lighthttp import encode_query

    assert encode_query(params) == urlencode(params)


# --- TLS (done by the client over ssl.MemoryBIO, not by asyncio's SSLProtocol) ---------------


@asynccontextmanager
async def serving_tls(
    server: ScriptedServer, tmp_path: Path, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    from agent.bootstrap import tls_context
    from shared.devstack import dev_tls

    ca, served = dev_tls(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(served.cert, served.key)
    listener = await asyncio.start_server(server.handle, host, 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"https://{host}:{port}", tls_context(ca.cert)
    finally:
        listener.close()
        await listener.wait_closed()


async def test_tls_keeps_one_verified_connection_alive_and_reads_gzip(tmp_path: Path) -> None:
    body = b'{"policy": "' + b"y" * 100_000 + b'"}'
    packed = gzip.compress(body)
    server = ScriptedServer(lambda _: ok(packed, "Content-Encoding: gzip"))
    async with serving_tls(server, tmp_path) as (url, tls):
        client = LightHttpClient(url, tls)
        for _ in range(3):
            answer = await client.request("GET", url + "/x", headers={}, timeout=5)
            assert answer.status_code == 200 and answer.content == body
        await client.aclose()
    assert server.connections == 1 and len(server.requests) == 3


async def test_tls_large_plain_answer_spanning_many_records(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: many TLS records and reads
    server = ScriptedServer(lambda _: ok(body))
    async with serving_tls(server, tmp_path) as (url, tls):
        client = LightHttpClient(url, tls)
        answer = await client.request("GET", url + "/x", headers={}, timeout=10)
        await client.aclose()
    assert answer.content == body


async def test_tls_an_untrusted_certificate_is_a_connect_error(tmp_path: Path) -> None:
    server = ScriptedServer(lambda _: ok(b"{}"))
    async with serving_tls(server, tmp_path / "served") as (url, _):
        from agent.bootstrap import tls_context
        from shared.devstack import dev_tls

        other_ca, _ = dev_tls(tmp_path / "other")
        client = LightHttpClient(url, tls_context(other_ca.cert))
        with pytest.raises(httpx.ConnectError):
            await client.request("GET", url + "/x", headers={}, timeout=5)
        await client.aclose()
    assert not server.requests


async def test_tls_a_name_the_certificate_does_not_hold_is_a_connect_error(
    tmp_path: Path,
) -> None:
    server = ScriptedServer(lambda _: ok(b"{}"))
    # 127.0.0.2 is loopback too, and not among the certificate's names (127.0.0.1, localhost).
    async with serving_tls(server, tmp_path, host="127.0.0.2") as (url, tls):
        client = LightHttpClient(url, tls)
        with pytest.raises(httpx.ConnectError, match=r"(?i)mismatch|match"):
            await client.request("GET", url + "/x", headers={}, timeout=5)
        await client.aclose()
    assert not server.requests


async def test_tls_retries_once_when_the_server_closed_the_idle_connection(
    tmp_path: Path,
) -> None:
    server = ScriptedServer(lambda _: ok(b"{}"), close_after=1)
    async with serving_tls(server, tmp_path) as (url, tls):
        client = LightHttpClient(url, tls)
        for _ in range(3):
            answer = await client.request("GET", url + "/x", headers={}, timeout=5)
            assert answer.status_code == 200
        await client.aclose()
    assert server.connections == 3


async def test_tls_a_server_that_closes_mid_answer_is_a_protocol_error(tmp_path: Path) -> None:
    half = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(half)
        await writer.drain()
        writer.close()

    server = ScriptedServer(lambda _: None)
    server.handle = cut  # type: ignore[method-assign]
    async with serving_tls(server, tmp_path) as (url, tls):
        client = LightHttpClient(url, tls)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.request("GET", url + "/x", headers={}, timeout=5)
        await client.aclose()


async def test_tls_silence_is_a_read_timeout(tmp_path: Path) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        await asyncio.sleep(5)
        writer.close()

    server = ScriptedServer(lambda _: None)
    server.handle = mute  # type: ignore[method-assign]
    async with serving_tls(server, tmp_path) as (url, tls):
        client = LightHttpClient(url, tls)
        with pytest.raises(httpx.ReadTimeout):
            await client.request("GET", url + "/x", headers={}, timeout=0.3)
        await client.aclose()
