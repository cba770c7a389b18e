"""Presence: an agent's poll republishes its registration with last_seen, once per interval."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.errors import KafkaConnectionError

from services.enforcer.presence import Presence
from shared.messages import EndpointRegistered

pytestmark = pytest.mark.unit

ENROLLED = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = ENROLLED + timedelta(hours=1)

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return (self.now - ENROLLED).total_seconds()


class ExpiringGate:
    """``SET NX EX`` in memory, on the test's clock; counts the claims that reach it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.until: dict[str, datetime] = {}
        self.claims = 0

    async def claim(self, endpoint_id: str, interval_s: int) -> float:
        self.claims += 1
        held = self.until.get(endpoint_id)
        if held is not None and held > self.clock.now:
            return (held - self.clock.now).total_seconds()
        self.until[endpoint_id] = self.clock.now + timedelta(seconds=interval_s)
        return 0.0

    async def reopen(self, endpoint_id: str) -> None:
        self.until.pop(endpoint_id, None)


class Registrations:
    async def registration(self, endpoint_id: str) -> EndpointRegistered | None:
        if endpoint_id != "ep-1":
            return None
        return EndpointRegistered(
            endpoint_id="ep-1",
            account_id="acct-1",
            hostname="web-01",
            platform="windows",
            enrolled_at=ENROLLED,
        )


class Published:
    def __init__(self) -> None:
        self.messages: list[EndpointRegistered] = []
        self.failing = False

    async def __call__(self, message: EndpointRegistered) -> None:
        if self.failing:
            raise KafkaConnectionError("broker away")
        self.messages.append(message)


def presence(interval_s: int = 300) -> tuple[Presence, Published, Clock]:
    seen, published, clock, _ = presence_and_gate(interval_s)
    return seen, published, clock


def presence_and_gate(
    interval_s: int = 300, gate: ExpiringGate | None = None, clock: Clock | None = None
) -> tuple[Presence, Published, Clock, ExpiringGate]:
    clock = clock or Clock()
    gate = gate or ExpiringGate(clock)
    published = Published()
    seen = Presence(gate, Registrations(), published, interval_s, clock, clock.monotonic)
    return seen, published, clock, gate


async def test_first_poll_publishes_the_full_registration_with_last_seen() -> None:
    seen, published, clock = presence()
    assert await seen.seen("ep-1")
    (message,) = published.messages
    assert (message.endpoint_id, message.account_id, message.hostname, message.platform) == (
        "ep-1",
        "acct-1",
        "web-01",
        "windows",
    )
    assert message.enrolled_at == ENROLLED
    assert message.last_seen == clock.now


async def test_polls_within_the_interval_publish_nothing_and_the_next_interval_publishes() -> None:
    seen, published, clock = presence(interval_s=300)
    assert await seen.seen("ep-1")
    clock.now += timedelta(seconds=299)
    assert not await seen.seen("ep-1")
    assert len(published.messages) == 1
    clock.now += timedelta(seconds=2)
    assert await seen.seen("ep-1")
    assert [m.last_seen for m in published.messages][-1] == clock.now


async def test_a_failed_publish_frees_the_interval_for_the_next_poll() -> None:
    seen, published, _ = presence()
    published.failing = True
    with pytest.raises(KafkaConnectionError):
        await seen.seen("ep-1")
    published.failing = False
    assert await seen.seen("ep-1")
    assert len(published.messages) == 1


async def test_an_unknown_agent_publishes_nothing() -> None:
    seen, published, _ = presence()
    assert not await seen.seen("ep-gone")
    assert published.messages == []


async def test_note_poll_never_raises_and_reports_through_the_log() -> None:
    seen, published, _ = presence()
    published.failing = True
    seen.note_poll("ep-1")
    await seen.drain()
    published.failing = False
    seen.note_poll("ep-1")
    await seen.drain()
    assert len(published.messages) == 1


async def test_polls_inside_an_interval_this_instance_took_ask_redis_nothing() -> None:
    seen, published, clock, gate = presence_and_gate(interval_s=300)
    assert await seen.seen("ep-1")
    for _ in range(5):
        clock.now += timedelta(seconds=50)
        assert not await seen.seen("ep-1")
    assert gate.claims == 1
    clock.now += timedelta(seconds=51)
    assert await seen.seen("ep-1")
    assert (gate.claims, len(published.messages)) == (2, 2)


async def test_an_interval_another_instance_took_is_asked_once_and_then_waited_out() -> None:
    clock = Clock()
    shared_gate = ExpiringGate(clock)
    first, first_published, _, _ = presence_and_gate(300, shared_gate, clock)
    second, second_published, _, _ = presence_and_gate(300, shared_gate, clock)
    assert await first.seen("ep-1")
    clock.now += timedelta(seconds=100)
    assert not await second.seen("ep-1")  # asks, learns 200 s remain
    clock.now += timedelta(seconds=199)
    assert not await second.seen("ep-1")  # remembered: no claim
    assert shared_gate.claims == 2
    clock.now += timedelta(seconds=2)
    assert await second.seen("ep-1")
    assert (len(first_published.messages), len(second_published.messages)) == (1, 1)


async def test_note_poll_starts_no_task_while_the_interval_is_known_taken() -> None:
    seen, published, _, gate = presence_and_gate(interval_s=300)
    seen.note_poll("ep-1")
    await seen.drain()
    seen.note_poll("ep-1")
    assert seen.updates_in_flight == 0  # decided on the spot: nothing to wait for
    assert (gate.claims, len(published.messages)) == (1, 1)
