"""The enforcer on a 3-master Redis Cluster: starts, enrolls, delivers, wakes long polls."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.enforcer.config import EnforcerSettings
from shared.infra.proc import free_port
from shared.infra.redis_cluster import LocalRedisCluster
from shared.messages import SignedPolicy
from shared.redis import bucket_of
from shared.topics import Topics
from tests.helpers import ServiceProcess
from tests.integration.enforcer.conftest import (
    AgentClient,
    enroll,
    policy_command,
    running_enforcer,
    send_command,
)

pytestmark = pytest.mark.integration

AGENTS = 12


def keys_per_node(cluster: LocalRedisCluster, prefix: str) -> list[int]:
    counts = []
    for port in cluster.ports:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}*"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        counts.append(len(out.split()))
    return counts


def sequence_of(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return SignedPolicy.model_validate_json(response.content).policy.sequence


async def deliver_to_everyone(
    agents: list[AgentClient], account_id: str, producer: Any, topics: Topics
) -> None:
    """Sequence 1 to every agent, then 2 while they all long-poll (woken in every bucket)."""
    for agent in agents:
        await send_command(
            producer,
            topics.enforcer_commands,
            policy_command(agent.agent_id, 1, account_id=account_id),
        )
    first = await asyncio.gather(*(a.poll(after=0, wait=30) for a in agents))
    assert [sequence_of(r) for r in first] == [1] * len(agents)
    waiting = [asyncio.create_task(a.poll(after=1, wait=40)) for a in agents]
    for agent in agents:
        await send_command(
            producer,
            topics.enforcer_commands_priority,
            policy_command(agent.agent_id, 2, mode="strict", account_id=account_id),
        )
    # Far below the 40 s wait: only wake-ups answer this soon.
    answered = await asyncio.wait_for(asyncio.gather(*waiting), timeout=25)
    assert [sequence_of(r) for r in answered] == [2] * len(agents)
    report = await agents[0].report(
        sequence=2,
        policy_id=f"pol-{agents[0].agent_id[:8]}-2",
        status="applied",
        rules_sha256="a" * 64,
    )
    assert report.status_code == 202, report.text


async def test_the_enforcer_process_starts_on_a_redis_cluster_url_and_delivers(
    redis_cluster: LocalRedisCluster,
    service_env: dict[str, str],
    redis_prefix: str,
    topics: Topics,
    producer: Any,
    tmp_path: Path,
) -> None:
    env = {**service_env, "HOSTISO_REDIS_URL": redis_cluster.url}
    enforcer = ServiceProcess("services.enforcer", env, free_port(), tmp_path / "enforcer.log")
    enforcer.start()
    try:
        await enforcer.wait_ready()
        async with httpx.AsyncClient(base_url=enforcer.url, timeout=60) as http:
            ready = await http.get("/ready")
            assert ready.status_code == 200, ready.text
            agents = [await enroll(http, "acct-rc") for _ in range(AGENTS)]
            assert len({bucket_of(a.agent_id) for a in agents}) > 3
            await deliver_to_everyone(agents, "acct-rc", producer, topics)
            metrics = (await http.get("/metrics")).text
            assert "hostiso_enforcer_endpoints_by_delivery_state" in metrics
    finally:
        enforcer.kill()
    # The endpoints' keys live on every master, not on one hot node.
    assert all(count > 0 for count in keys_per_node(redis_cluster, redis_prefix))


async def test_hostiso_redis_cluster_turns_a_plain_node_url_into_a_cluster_client(
    redis_cluster: LocalRedisCluster,
    enforcer_settings: Callable[..., EnforcerSettings],
    producer: Any,
    topics: Topics,
) -> None:
    node_url = redis_cluster.url.replace("redis+cluster://", "redis://")
    settings = enforcer_settings(redis_url=node_url, redis_cluster=True)
    async with running_enforcer(settings) as (app, http):
        assert (await http.get("/ready")).status_code == 200
        assert app.state.wakeups.shards == 3
        agents = [await enroll(http, "acct-rc2") for _ in range(4)]
        await deliver_to_everyone(agents, "acct-rc2", producer, topics)
