"""The agent's backoff honours ``Retry-After`` on 503 and 429, within a floor and a cap.

Both clients (httpx for the real agent, ``agent.lighthttp`` for simulated ones) carry the value
to :class:`agent.client.EnforcerUnavailableError`; :class:`agent.loop.Backoff` bounds it so a
peer can neither stall an agent for ever nor make it hammer.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from agent.addresses import HostFacts
from agent.applier import AgentStats
from agent.client import (
    EnforcerClient,
    EnforcerUnavailableError,
    Enrollment,
    StatusReport,
    parse_retry_after,
)
from agent.firewall import SimulatedFirewall
from agent.lighthttp import LightHttpClient
from agent.loop import (
    RETRY_AFTER_FLOOR_S,
    RETRY_AFTER_JITTER,
    AgentIdentity,
    AgentLoop,
    Backoff,
)
from agent.state import StateStore
from agent.verification import PinnedKey
from tests.unit.agent.policies import TestSigner
from tests.unit.agent.test_lighthttp import ScriptedServer, ok, serving

NOW = 1_800_000_000.0
ENROLLMENT = Enrollment("ep-1", "tok")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("00017", 17.0),
        (None, None),
        ("", None),
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("\u0663", None),  # an Arabic-Indic digit: str.isdigit() says yes, RFC 9110 says no
        ("9" * 65, None),
        ("Fri, 31 Dec 1999 23:59:59 -0000", None),  # no zone: not an HTTP-date
    ],
)
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_http_dates_count_from_now_and_a_past_one_is_zero() -> None:
    now = datetime.fromtimestamp(NOW, UTC)
    later = format_datetime(now + timedelta(seconds=42), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=42), usegmt=True)
    assert parse_retry_after(later, now=NOW) == pytest.approx(42.0)
    assert parse_retry_after(earlier, now=NOW) == 0.0


def _delays(backoff: Backoff, retry_after: float | None, n: int = 200) -> list[float]:
    delays = []
    for _ in range(n):
        backoff.reset()
        delays.append(backoff.delay(retry_after))
    return delays


def test_backoff_waits_at_least_what_retry_after_asks_with_a_little_jitter() -> None:
    backoff = Backoff(asyncio.Event(), base=0.5, cap=30.0)
    delays = _delays(backoff, 5.0)
    assert all(5.0 <= d <= 5.0 * (1 + RETRY_AFTER_JITTER) for d in delays)
    assert len(set(delays)) > 1  # a fleet told "5" does not come back together
    assert all(d <= 0.5 for d in _delays(backoff, None))  # without it: the backoff's own


def test_retry_after_is_capped_floored_and_never_shortens_the_backoff() -> None:
    backoff = Backoff(asyncio.Event(), base=0.5, cap=30.0)
    assert all(d <= 30.0 for d in _delays(backoff, 1e9))
    assert all(d <= 30.0 for d in _delays(backoff, math.inf))
    assert all(d >= RETRY_AFTER_FLOOR_S for d in _delays(backoff, 0.0))
    assert all(d <= 0.5 for d in _delays(backoff, math.nan))  # unreadable: ignored
    # Late in a backoff, a short Retry-After does not bring the retry forward.
    backoff.attempt = 10
    late = backoff.delay(1.0)
    assert backoff.attempt == 11 and late >= 1.0
    # A configured cap below the floor wins: the operator's bound is the outer one.
    small = Backoff(asyncio.Event(), base=0.01, cap=0.2)
    assert all(d <= 0.2 for d in _delays(small, 60.0))


def _httpx(status: int, headers: dict[str, str]) -> httpx.AsyncClient:
    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, content=b'{"status": %d}' % status)

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (503, {"Retry-After": "4"}, 4.0),
        (429, {"retry-after": "9"}, 9.0),
        (503, {}, None),
        (503, {"Retry-After": "later"}, None),
        (500, {"Retry-After": "4"}, None),  # only 503 and 429 give it its meaning
        (502, {"Retry-After": "4"}, None),
    ],
)
async def test_both_clients_carry_retry_after_of_503_and_429(
    status: int, headers: dict[str, str], expected: float | None
) -> None:
    real = EnforcerClient("http://enforcer.test", _httpx(status, headers))
    with pytest.raises(EnforcerUnavailableError) as unavailable:
        await real.poll_policy(ENROLLMENT, after=0, wait=1)
    assert unavailable.value.retry_after == expected

    extra = [f"{name}: {value}" for name, value in headers.items()]
    server = ScriptedServer(lambda _: ok(b"{}", *extra, status=f"{status} X"))
    async with serving(server) as url:
        light = LightHttpClient(url, None)
        simulated = EnforcerClient(url, light)
        with pytest.raises(EnforcerUnavailableError) as unavailable:
            await simulated.poll_policy(ENROLLMENT, after=0, wait=1)
        await light.aclose()
    assert unavailable.value.retry_after == expected


async def test_an_enrollment_429_carries_retry_after() -> None:
    client = EnforcerClient(
        "http://enforcer.test", _httpx(429, {"Retry-After": "31"}), allow_plain_http=True
    )
    with pytest.raises(EnforcerUnavailableError) as unavailable:
        await client.enroll(account_id="a", enrollment_key="k", hostname="h", platform="linux")
    assert unavailable.value.retry_after == 31.0


async def test_the_poll_loop_waits_what_the_enforcer_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 Retry-After 7, 429 Retry-After 3, 503 without: the waits asked of the backoff."""
    signer = TestSigner()
    answers = [(503, {"Retry-After": "7"}), (429, {"Retry-After": "3"}), (503, {})]
    stop = asyncio.Event()
    asked: list[float | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if not answers:
            stop.set()
            return httpx.Response(204)
        status, headers = answers.pop(0)
        return httpx.Response(status, headers=headers)

    async def no_wait(self: Backoff, retry_after: float | None = None) -> None:
        asked.append(retry_after)
        delay = self.delay(retry_after)
        if retry_after is not None:
            assert delay >= retry_after
        await asyncio.sleep(0)

    monkeypatch.setattr(Backoff, "wait", no_wait)
    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    store = StateStore(tmp_path, durable=False)
    state = store.load()
    state.agent_id, state.agent_token = "ep-1", "tok"
    store.save(state)

    async def key() -> str:
        return "k"

    loop = AgentLoop(
        identity=AgentIdentity("acct-1", "web-01", "linux"),
        client=EnforcerClient("http://enforcer.test", http, allow_plain_http=True),
        store=store,
        firewall=SimulatedFirewall(HostFacts(platform_addresses=()), "hostiso"),
        enrollment_key=key,
        stats=AgentStats(),
        configured_key=PinnedKey.from_base64(signer.public_b64),
        poll_wait=1,
        table_check_interval=None,
        usage_interval=None,
    )
    async with asyncio.timeout(10):
        await loop.run(stop)
    assert asked == [7.0, 3.0, None]
    assert loop.stats.poll_errors == 3

    # A status report's retries too.
    reports = [(503, {"Retry-After": "2"}), (200, {})]

    def report_answer(request: httpx.Request) -> httpx.Response:
        status, headers = reports.pop(0)
        return httpx.Response(status, headers=headers, content=b"{}")

    asked.clear()
    loop.client.http = httpx.AsyncClient(transport=httpx.MockTransport(report_answer))
    report = StatusReport(1, "pol-1", "applied", None, "")
    async with asyncio.timeout(10):
        await loop._report(asyncio.Event(), ENROLLMENT, report)
    assert asked == [2.0] and not reports
