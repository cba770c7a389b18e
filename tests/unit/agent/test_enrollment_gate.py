"""Simulated fleets enroll a bounded number of agents at a time (issue 14's full bench)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.applier import AgentStats
from agent.bootstrap import AgentConfig, AgentConfigError, build_loops, validate_config
from agent.client import ENROLL_TIMEOUT_S, EnforcerClient, HttpAnswer
from agent.lighthttp import LightResponse


class SlowEnforcer:
    """Answers every enrollment after ``delay`` s; records the most calls in flight at once."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.timeouts: list[float] = []

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        timeout: float,
        json: Any,
        params: Mapping[str, int | float] | None,
    ) -> HttpAnswer:
        self.timeouts.append(timeout)
        body = b'{"agent_id": "ep-%d", "agent_token": "t"}' % len(self.timeouts)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return LightResponse(200, {}, body)


async def _enroll(client: EnforcerClient, host: str) -> str:
    enrolled = await client.enroll(
        account_id="acct-1", enrollment_key="k", hostname=host, platform="linux"
    )
    return enrolled.agent_id


async def test_agents_sharing_a_gate_never_have_more_enrollments_in_flight_than_it_allows() -> None:
    enforcer = SlowEnforcer()
    gate = asyncio.Semaphore(3)
    clients = [
        EnforcerClient("http://e", enforcer, allow_plain_http=True, enrollment_gate=gate)
        for _ in range(20)
    ]
    ids = await asyncio.gather(*(_enroll(c, f"h{i}") for i, c in enumerate(clients)))
    assert len(set(ids)) == 20
    assert enforcer.most_in_flight == 3


async def test_waiting_for_the_gate_does_not_use_up_the_enrollment_timeout() -> None:
    # Each enrollment takes 0.05 s and only one runs at a time: the last of ten waits 0.45 s
    # for its turn, far past what its own timeout would allow if the wait counted.
    enforcer = SlowEnforcer(delay=0.05)
    gate = asyncio.Semaphore(1)
    clients = [
        EnforcerClient("http://e", enforcer, allow_plain_http=True, enrollment_gate=gate)
        for _ in range(10)
    ]
    await asyncio.gather(*(_enroll(c, f"h{i}") for i, c in enumerate(clients)))
    # The timeout goes to the request itself, started only once the gate is passed.
    assert enforcer.timeouts == [ENROLL_TIMEOUT_S] * 10


async def test_without_a_gate_enrollments_are_not_bounded() -> None:
    enforcer = SlowEnforcer()
    clients = [EnforcerClient("http://e", enforcer, allow_plain_http=True) for _ in range(8)]
    await asyncio.gather(*(_enroll(c, f"h{i}") for i, c in enumerate(clients)))
    assert enforcer.most_in_flight == 8


def _config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "enforcer_url": "http://127.0.0.1:1",
        "account_id": "acct-1",
        "state_dir": tmp_path,
        "hostname": "h",
        "enrollment_key": "k",
        "dev": True,
        "simulated": True,
    }
    return AgentConfig(**(values | overrides))


def test_the_agents_of_one_process_share_one_enrollment_gate(tmp_path: Path) -> None:
    config = _config(tmp_path, count=4, enroll_concurrency=2)
    loops = build_loops(config, SlowEnforcer(), AgentStats())
    gates = {id(loop.client.enrollment_gate) for loop in loops}
    assert len(gates) == 1
    gate = loops[0].client.enrollment_gate
    assert gate is not None and gate._value == 2


def test_one_agent_or_no_bound_has_no_gate(tmp_path: Path) -> None:
    (single,) = build_loops(_config(tmp_path, count=1), SlowEnforcer(), AgentStats())
    assert single.client.enrollment_gate is None
    unbounded = build_loops(
        _config(tmp_path, count=3, enroll_concurrency=0), SlowEnforcer(), AgentStats()
    )
    assert all(loop.client.enrollment_gate is None for loop in unbounded)


def test_a_negative_enrollment_concurrency_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="--enroll-concurrency"):
        validate_config(_config(tmp_path, count=2, enroll_concurrency=-1))
