"""Guarantee 5: a strict command overtakes a real 100,000-command backlog on the normal lane."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from services.enforcer.measure import committed_total, produce_backlog
from shared.infra.proc import free_port
from shared.messages import SignedPolicy
from shared.topics import Topics
from tests.helpers import ServiceProcess, kafka_admin_options, wait_for
from tests.integration.enforcer.conftest import enroll, policy_command, send_command

BACKLOG = 100_000


async def test_strict_command_reaches_the_agent_while_the_normal_backlog_is_mostly_unconsumed(
    service_env: dict[str, str],
    topics: Topics,
    topic_prefix: str,
    kafka_bootstrap: str,
    producer: Any,
    tmp_path: Path,
) -> None:
    await produce_backlog(
        kafka_bootstrap,
        topics.enforcer_commands,
        BACKLOG,
        endpoints=10_000,
        options=kafka_admin_options(),
    )
    enforcer = ServiceProcess("services.enforcer", service_env, free_port(), tmp_path / "e.log")
    enforcer.start()
    try:
        await enforcer.wait_ready(timeout=90)
        async with httpx.AsyncClient(base_url=enforcer.url, timeout=90) as http:
            agent = await enroll(http)
            waiting = asyncio.create_task(agent.poll(after=0, wait=60))

            async def agent_waiting() -> bool:
                metrics = (await http.get("/metrics")).text
                return "hostiso_enforcer_waiting_agents 1.0" in metrics

            await wait_for(agent_waiting, message="agent long-polling")
            sent = time.monotonic()
            strict = policy_command(agent.agent_id, 1, mode="strict")
            await send_command(producer, topics.enforcer_commands_priority, strict)
            response = await asyncio.wait_for(waiting, timeout=30)
            latency = time.monotonic() - sent
            consumed = await committed_total(
                kafka_bootstrap, f"{topic_prefix}enforcer-normal", options=kafka_admin_options()
            )

            assert response.status_code == 200
            assert SignedPolicy.model_validate_json(response.content).policy.mode == "strict"
            print(f"\nstrict latency {latency * 1000:.0f} ms; normal lane consumed {consumed}")
            assert consumed < BACKLOG / 2, f"normal lane already consumed {consumed} of {BACKLOG}"
    finally:
        enforcer.kill()
