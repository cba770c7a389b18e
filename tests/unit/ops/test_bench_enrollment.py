"""The bench's side of enrolling a 10,000-agent fleet (issue 14): which ids count, settings writes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from bench.figures import PhaseClock, settings_write
from bench.stack import AgentGroup, _held_id


def _group(tmp_path: Path, count: int, per_process: int, concurrency: int = 50) -> AgentGroup:
    return AgentGroup(
        account_id="acct-1",
        count=count,
        state_dir=tmp_path,
        log_path=tmp_path / "agents.log",
        per_process=per_process,
        enroll_concurrency=concurrency,
    )


def test_state_paths_follow_the_agent_layout_of_each_process(tmp_path: Path) -> None:
    group = _group(tmp_path, count=5, per_process=3)
    assert group.shares == [3, 2]
    assert group.state_paths() == [
        tmp_path / "p0" / "agent-0" / "agent-state.json",
        tmp_path / "p0" / "agent-1" / "agent-state.json",
        tmp_path / "p0" / "agent-2" / "agent-state.json",
        tmp_path / "p1" / "agent-0" / "agent-state.json",
        tmp_path / "p1" / "agent-1" / "agent-state.json",
    ]


def test_a_process_of_one_agent_keeps_its_state_in_the_process_dir(tmp_path: Path) -> None:
    group = _group(tmp_path, count=1, per_process=100)
    assert group.state_paths() == [tmp_path / "p0" / "agent-state.json"]


def test_the_fleet_enrollment_bound_is_split_among_the_processes(tmp_path: Path) -> None:
    assert _group(tmp_path, 10_000, 2000).enroll_concurrency_per_process == 10
    assert _group(tmp_path, 10, 100).enroll_concurrency_per_process == 50
    # Never 0 (which the agent reads as "no bound") because of rounding.
    assert _group(tmp_path, 100, 1).enroll_concurrency_per_process == 1
    assert _group(tmp_path, 100, 10, concurrency=0).enroll_concurrency_per_process == 0


def test_only_an_agent_that_holds_an_endpoint_id_counts_as_enrolled(tmp_path: Path) -> None:
    held: dict[Path, str] = {}
    missing = tmp_path / "none.json"
    torn = tmp_path / "torn.json"
    torn.write_bytes(b'{"agent_id": "ep')
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"agent_id": None, "last_applied_sequence": 0}))
    enrolled = tmp_path / "enrolled.json"
    enrolled.write_text(json.dumps({"agent_id": "ep-1", "agent_token": "t"}))
    assert [_held_id(p, held) for p in (missing, torn, before, enrolled)] == [
        False,
        False,
        False,
        True,
    ]
    assert held == {enrolled: "ep-1"}


def _settings(*answers: httpx.Response) -> tuple[httpx.AsyncClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(answers)

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.AsyncClient(transport=httpx.MockTransport(answer)), seen


async def test_a_write_saved_but_not_yet_published_is_not_written_twice() -> None:
    unpublished = httpx.Response(503, json={"title": "Not yet published", "version": 3})
    http, seen = _settings(unpublished)
    async with http:
        response = await settings_write(http, "POST", "http://s/entries", {"a": 1}, {})
    assert response.status_code == 503
    assert len(seen) == 1


async def test_a_write_the_service_could_not_take_is_retried_until_it_succeeds() -> None:
    http, seen = _settings(
        httpx.Response(503, json={"title": "Temporarily unavailable"}),
        httpx.Response(500),
        httpx.Response(201, json={"id": "e1"}),
    )
    async with http:
        response = await settings_write(http, "POST", "http://s/entries", {"a": 1}, {})
    assert response.status_code == 201
    assert len(seen) == 3


async def test_a_refused_write_fails_at_once_and_a_lasting_outage_after_the_deadline() -> None:
    http, seen = _settings(httpx.Response(422, json={"title": "invalid"}))
    async with http:
        with pytest.raises(httpx.HTTPStatusError):
            await settings_write(http, "POST", "http://s/entries", {}, {})
    assert len(seen) == 1
    http, seen = _settings(*[httpx.Response(503, json={})] * 3)
    async with http:
        with pytest.raises(httpx.HTTPStatusError):
            await settings_write(http, "PATCH", "http://s/a", {}, {}, timeout=0.0)
    assert len(seen) == 1


def test_each_phase_is_timed_from_the_end_of_the_previous_one() -> None:
    clock = PhaseClock()
    clock.mark("infra")
    clock.mark("enroll")
    assert list(clock.seconds) == ["infra", "enroll"]
    assert all(seconds >= 0 for seconds in clock.seconds.values())
