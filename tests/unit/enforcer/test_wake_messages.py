"""A wake message names one or several endpoints (``<endpoint> <sequence>`` lines)."""

from __future__ import annotations

from services.enforcer.adapters.wakeups import RedisPolicyWakeups


def _woken(message: bytes, waiting: list[str]) -> list[str]:
    hub = RedisPolicyWakeups("redis://127.0.0.1:1/0", [])
    with_waiters = [hub.waiter(e) for e in waiting]
    armed = [w.__enter__() for w in with_waiters]
    for waiter in armed:
        waiter.arm()
    hub._dispatch(message)
    woken = [e for e, w in zip(waiting, armed, strict=True) if w._event.is_set()]
    for context in with_waiters:
        context.__exit__(None, None, None)
    assert hub.waiting_count == 0
    return woken


def test_a_single_endpoint_message_wakes_that_endpoint() -> None:
    assert _woken(b"ep-1 7", ["ep-1", "ep-2"]) == ["ep-1"]


def test_a_bucket_message_wakes_each_endpoint_it_names() -> None:
    assert sorted(_woken(b"ep-1 7\nep-3 2\nep-9 1", ["ep-1", "ep-2", "ep-3"])) == ["ep-1", "ep-3"]


def test_odd_messages_wake_only_exact_names() -> None:
    assert _woken(b"", ["ep-1"]) == []
    assert _woken(b"ep-1", ["ep-1"]) == ["ep-1"]  # no sequence: still that endpoint
    assert _woken(b"ep-1 7\n\nep-2 \xff", ["ep-1", "ep-2"]) == ["ep-1", "ep-2"]
    assert _woken(b"ep-10 1", ["ep-1"]) == []
