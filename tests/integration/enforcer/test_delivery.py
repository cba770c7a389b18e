"""Desired state and delivery on the real Kafka and Redis: fencing, offline agents, wake-ups."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI

from services.enforcer.config import EnforcerSettings
from services.enforcer.domain import NORMAL_LANE, PRIORITY_LANE
from services.enforcer.handlers import store_policy_commands
from shared.messages import SignedPolicy
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.enforcer.conftest import (
    enroll,
    policy_command,
    running_enforcer,
    send_command,
)

Running = tuple[FastAPI, httpx.AsyncClient]


def sequence_of(response: httpx.Response) -> int:
    assert response.status_code == 200, response.status_code
    return SignedPolicy.model_validate_json(response.content).policy.sequence


async def test_priority_strict_beats_an_older_normal_command_that_arrives_later(
    enforcer: Running, producer: Any, topics: Topics
) -> None:
    app, http = enforcer
    agent = await enroll(http)
    strict = policy_command(agent.agent_id, 3, mode="strict")
    await send_command(producer, topics.enforcer_commands_priority, strict)
    assert sequence_of(await agent.poll(after=0, wait=20)) == 3
    normal = app.state.lanes[NORMAL_LANE]
    before = normal.processed
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 2))
    await send_command(producer, topics.enforcer_commands, strict)  # duplicate, other lane
    await wait_for(lambda: normal.processed >= before + 2, message="normal lane caught up")
    response = await agent.poll(after=0)
    signed = SignedPolicy.model_validate_json(response.content)
    assert (signed.policy.sequence, signed.policy.mode) == (3, "strict")
    assert (await agent.poll(after=3)).status_code == 204


async def test_offline_agent_gets_only_the_newest_of_three_policies(
    enforcer: Running, producer: Any, topics: Topics
) -> None:
    app, http = enforcer
    agent = await enroll(http)
    for sequence in (1, 2, 3):
        await send_command(
            producer, topics.enforcer_commands, policy_command(agent.agent_id, sequence)
        )
    normal = app.state.lanes[NORMAL_LANE]
    await wait_for(lambda: normal.processed >= 3, message="three commands consumed")
    assert sequence_of(await agent.poll(after=0, wait=0)) == 3


async def test_waiting_agent_is_answered_soon_after_a_policy_is_stored(
    enforcer: Running, producer: Any, topics: Topics
) -> None:
    app, http = enforcer
    agent = await enroll(http)
    waiting = asyncio.create_task(agent.poll(after=0, wait=60))
    await wait_for(lambda: app.state.wakeups.waiting_count >= 1, message="agent waiting")
    await send_command(
        producer,
        topics.enforcer_commands_priority,
        policy_command(agent.agent_id, 1, mode="strict"),
    )
    # A generous deadline: far below the 60 s wait, so only a wake-up can answer in time.
    response = await asyncio.wait_for(waiting, timeout=20)
    assert sequence_of(response) == 1


async def test_policy_stored_by_another_instance_wakes_an_agent_waiting_on_this_one(
    enforcer: Running, enforcer_settings: Callable[..., EnforcerSettings]
) -> None:
    first_app, first_http = enforcer
    agent = await enroll(first_http)
    async with running_enforcer(enforcer_settings(instance_id="second")) as (second_app, _):
        waiting = asyncio.create_task(agent.poll(after=0, wait=60))
        await wait_for(lambda: first_app.state.wakeups.waiting_count >= 1, message="waiting")
        result = await store_policy_commands(
            second_app.state.deps, [policy_command(agent.agent_id, 1)], PRIORITY_LANE
        )
        assert result.stored == 1
        assert sequence_of(await asyncio.wait_for(waiting, timeout=20)) == 1


async def test_invalid_and_foreign_account_commands_go_to_the_dlq_and_the_lane_carries_on(
    enforcer: Running, producer: Any, topics: Topics, kafka_bootstrap: str
) -> None:
    app, http = enforcer
    agent = await enroll(http, "acct-1")
    await producer.send_and_wait(topics.enforcer_commands, b'{"type": "EnforcePolicy"}', key=b"x")
    foreign = policy_command(agent.agent_id, 1, account_id="acct-2")
    await send_command(producer, topics.enforcer_commands, foreign)
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 2))
    assert sequence_of(await agent.poll(after=0, wait=20)) == 2
    lane = app.state.lanes[NORMAL_LANE]
    letters = await read_topic(kafka_bootstrap, topics, topics.dlq, expect=2)
    reasons = sorted(letter.reason for letter in letters)
    assert any("invalid message" in r for r in reasons)
    assert any("another account" in r for r in reasons)
    await wait_for(lambda: lane.processed >= 3, message="all three records committed")


async def test_a_long_policy_is_served_gzipped_to_a_client_that_accepts_it_a_short_one_plain(
    enforcer: Running,
) -> None:
    app, http = enforcer
    short, long = await enroll(http), await enroll(http)
    commands = [policy_command(short.agent_id, 1), policy_command(long.agent_id, 1, peers=40)]
    await store_policy_commands(app.state.deps, commands, NORMAL_LANE)
    for agent, coded in ((short, None), (long, "gzip")):
        route = f"/v1/agents/{agent.agent_id}/policy"
        gzipped = await http.get(route, headers={**agent.auth, "Accept-Encoding": "gzip"})
        plain = await http.get(route, headers={**agent.auth, "Accept-Encoding": "identity"})
        assert gzipped.headers.get("content-encoding") == coded
        assert "content-encoding" not in plain.headers
        assert gzipped.headers["vary"] == plain.headers["vary"] == "Accept-Encoding"
        # httpx decoded any gzip: both are the same signed policy, byte for byte.
        assert gzipped.content == plain.content
        assert SignedPolicy.model_validate_json(plain.content).policy.sequence == 1
