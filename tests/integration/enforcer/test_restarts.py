"""Desired state survives a SIGKILLed enforcer process and a SIGKILLed Redis (AOF)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from services.enforcer.config import EnforcerSettings
from shared.infra import LocalRedis
from shared.infra.proc import free_port
from shared.messages import SignedPolicy
from shared.topics import Topics
from tests.helpers import ServiceProcess, wait_for
from tests.integration.enforcer.conftest import (
    AgentClient,
    enroll,
    policy_command,
    running_enforcer,
    send_command,
)


async def test_state_and_signing_key_survive_an_enforcer_crash(
    service_env: dict[str, str], topics: Topics, producer: Any, tmp_path: Path
) -> None:
    port = free_port()
    enforcer = ServiceProcess("services.enforcer", service_env, port, tmp_path / "enforcer.log")
    enforcer.start()
    try:
        await enforcer.wait_ready()
        async with httpx.AsyncClient(base_url=enforcer.url, timeout=40) as http:
            agent = await enroll(http)
            key_before = (await http.get("/v1/signing-key")).json()
            await send_command(
                producer, topics.enforcer_commands, policy_command(agent.agent_id, 1)
            )
            first = await agent.poll(after=0, wait=20)
            assert first.status_code == 200

            enforcer.kill()
            enforcer.start()
            await enforcer.wait_ready()

            again = await agent.poll(after=0)
            assert again.status_code == 200 and again.content == first.content
            assert (await http.get("/v1/signing-key")).json() == key_before
            await send_command(
                producer, topics.enforcer_commands, policy_command(agent.agent_id, 2)
            )
            newer = await agent.poll(after=1, wait=20)
            assert SignedPolicy.model_validate_json(newer.content).policy.sequence == 2
    finally:
        enforcer.kill()


async def test_state_survives_a_redis_crash_and_wakeups_resume(
    enforcer_settings: Callable[..., EnforcerSettings],
    topics: Topics,
    producer: Any,
    tmp_path: Path,
) -> None:
    (tmp_path / "redis").mkdir()
    redis = LocalRedis(appendfsync="always", workdir=tmp_path / "redis").start()
    try:
        settings = enforcer_settings(redis_url=redis.url)
        async with running_enforcer(settings) as (app, http):
            agent = await enroll(http)
            await send_command(
                producer, topics.enforcer_commands, policy_command(agent.agent_id, 1)
            )
            first = await agent.poll(after=0, wait=20)
            assert first.status_code == 200

            redis.restart(kill=True)

            async def poll_ok(client: AgentClient) -> httpx.Response | None:
                response = await client.poll(after=0)
                return response if response.status_code == 200 else None

            again = await wait_for(lambda: poll_ok(agent), timeout=30, message="policy back")
            assert again.content == first.content
            await wait_for(app.state.wakeups.subscribed.is_set, message="resubscribed")
            waiting = asyncio.create_task(agent.poll(after=1, wait=30))
            await wait_for(lambda: app.state.wakeups.waiting_count >= 1, message="waiting")
            await send_command(
                producer, topics.enforcer_commands, policy_command(agent.agent_id, 2)
            )
            response = await asyncio.wait_for(waiting, timeout=20)
            assert SignedPolicy.model_validate_json(response.content).policy.sequence == 2
    finally:
        redis.close()


async def test_a_shutdown_answers_the_waiting_long_polls_instead_of_cutting_them(
    service_env: dict[str, str], topics: Topics, tmp_path: Path
) -> None:
    import os
    import signal
    import time

    port = free_port()
    log = tmp_path / "enforcer.log"
    enforcer = ServiceProcess("services.enforcer", service_env, port, log)
    enforcer.start()
    try:
        await enforcer.wait_ready()
        async with httpx.AsyncClient(base_url=enforcer.url, timeout=40) as http:
            agents = [await enroll(http) for _ in range(5)]
            polls = [asyncio.create_task(agent.poll(after=0, wait=50)) for agent in agents]

            async def all_waiting() -> bool:
                metrics = (await http.get("/metrics")).text
                return "hostiso_enforcer_waiting_agents 5.0" in metrics

            await wait_for(all_waiting, timeout=20, message="five polls waiting")
            signalled = time.monotonic()
            os.killpg(enforcer.proc.pid, signal.SIGTERM)
            answers = await asyncio.gather(*polls)
            answered_in = time.monotonic() - signalled
        # Each one answered "nothing newer" (the agent polls again), well before the server's
        # graceful timeout (3 s) would have cancelled it.
        assert [a.status_code for a in answers] == [204] * 5
        assert answered_in < 2.5, answered_in
        await asyncio.to_thread(enforcer.proc.wait, 20)
        text = log.read_text(errors="replace")
        assert "Exception in ASGI application" not in text
        assert "timeout graceful shutdown exceeded" not in text
    finally:
        enforcer.kill()
