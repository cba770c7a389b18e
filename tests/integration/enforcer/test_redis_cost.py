"""What an agent request and an isolated endpoint cost in Redis, on a private redis-server.

Round trips are counted with MONITOR between two markers (a Lua script's own commands show up
as ``lua`` entries, so they are told apart from the client's); bytes with MEMORY USAGE.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.enforcer.adapters.redis_store import (
    DELIVERY_STATES,
    TAG,
    RedisAgentStore,
    RedisPolicyStore,
)
from services.enforcer.adapters.wakeups import RedisPolicyWakeups
from services.enforcer.domain import NORMAL_LANE, token_digest
from services.enforcer.handlers import (
    AgentRecord,
    EnforcerDeps,
    authenticate_agent,
    poll_policy,
    report_policy_status,
    store_policy_commands,
)
from services.enforcer.signing import PolicySigner, generate_private_key_b64, parse_private_key
from shared.infra import LocalRedis
from shared.messages import AllowedPeer, EnforcePolicy
from shared.redis import Keys, bucket_tags, make_redis
from tests.helpers import wait_for
from tests.samples import sample_policy
from tests.unit.enforcer.fakes import (
    CountingRateLimiter,
    InMemoryEnrollmentKeys,
    RecordingEvents,
)

pytestmark = pytest.mark.integration

PREFIX = "cost:"


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    workdir = tmp_path_factory.mktemp("redis-cost")
    redis = LocalRedis(workdir=Path(workdir)).start()
    try:
        yield redis
    finally:
        redis.close()


@dataclass
class Lab:
    client: Redis
    deps: EnforcerDeps
    policies: RedisPolicyStore
    agents: RedisAgentStore


@pytest.fixture
async def lab(private_redis: LocalRedis) -> AsyncIterator[Lab]:
    client = make_redis(private_redis.url)
    keys = Keys(PREFIX + uuid.uuid4().hex[:8] + ":")
    policies = RedisPolicyStore(client, keys)
    agents = RedisAgentStore(client, keys)
    deps = EnforcerDeps(
        agents=agents,
        policies=policies,
        events=RecordingEvents(),
        wakeups=RedisPolicyWakeups(private_redis.url, policies.keys.wake_channels()),
        enrollment_keys=InMemoryEnrollmentKeys(),
        enrollment_rate=CountingRateLimiter(),
        signer_or_none=PolicySigner(parse_private_key(generate_private_key_b64())),
    )
    try:
        yield Lab(client, deps, policies, agents)
    finally:
        await client.aclose()
        await client.connection_pool.disconnect()


@contextlib.asynccontextmanager
async def monitored(client: Redis) -> AsyncIterator[list[tuple[str, str]]]:
    """(client type, command) of everything Redis ran inside the block, markers excluded."""
    seen: list[tuple[str, str]] = []
    marker = uuid.uuid4().hex

    async def listen() -> None:
        async with client.monitor() as monitor:
            async for info in monitor.listen():
                seen.append((info["client_type"], info["command"]))

    task = asyncio.create_task(listen())
    try:
        await wait_for(
            lambda: _echo_seen(client, seen, f"start-{marker}"), message="monitor started"
        )
        start = len(seen)
        inside: list[tuple[str, str]] = []
        yield inside
        await wait_for(lambda: _echo_seen(client, seen, f"end-{marker}"), message="end marker")
        end = next(i for i, (_, c) in enumerate(seen) if f"end-{marker}" in c)
        inside.extend(
            (kind, command) for kind, command in seen[start:end] if "ECHO" not in command.upper()
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _echo_seen(client: Redis, seen: list[tuple[str, str]], text: str) -> bool:
    await client.echo(text)
    await asyncio.sleep(0.02)
    return any(text in command for _, command in seen)


def command(endpoint_id: str, sequence: int, peers: int = 3) -> EnforcePolicy:
    policy = sample_policy(sequence).model_copy(
        update={
            "endpoint_id": endpoint_id,
            "policy_id": f"pol-{uuid.uuid4().hex[:12]}",
            "allowed_outbound": tuple(
                AllowedPeer(name=f"RMM relay {i}", address=f"203.0.113.{10 + i}")
                for i in range(peers)
            ),
        }
    )
    return EnforcePolicy(request_id=f"req-{endpoint_id}-{sequence}", policy=policy)


async def enrolled(lab: Lab, endpoint_id: str, token: str) -> None:
    record = AgentRecord(
        endpoint_id,
        "acct-1",
        "web-01.example.internal",
        "linux",
        token_digest(token),
        "2026-12-02T00:00:00+00:00",
    )
    await lab.agents.create(record)


def client_commands(ran: list[tuple[str, str]]) -> list[str]:
    return [c.split()[0].strip('"').upper() for kind, c in ran if kind != "lua"]


def script_commands(ran: list[tuple[str, str]]) -> list[str]:
    return [c.split()[0].strip('"').upper() for kind, c in ran if kind == "lua"]


async def test_an_idle_poll_is_one_round_trip_that_never_reads_the_signed_policy(lab: Lab) -> None:
    await enrolled(lab, "ep-idle", "token-idle")
    await store_policy_commands(lab.deps, [command("ep-idle", 1)], NORMAL_LANE)
    await poll_policy(lab.deps, "token-idle", "ep-idle", after=0, wait=0)  # scripts loaded
    async with monitored(lab.client) as ran:
        assert await poll_policy(lab.deps, "token-idle", "ep-idle", after=1, wait=0) is None
    assert client_commands(ran) == ["EVALSHA"]
    # The token digest, then the 20 bytes of the stored sequence: never the signed policy.
    assert script_commands(ran) == ["HMGET", "GETRANGE"]


async def test_a_delivering_poll_is_one_round_trip(lab: Lab) -> None:
    await enrolled(lab, "ep-new", "token-new")
    await store_policy_commands(lab.deps, [command("ep-new", 1)], NORMAL_LANE)
    await poll_policy(lab.deps, "token-new", "ep-new", after=1, wait=0)
    async with monitored(lab.client) as ran:
        held = await poll_policy(lab.deps, "token-new", "ep-new", after=0, wait=0)
    assert held is not None and held.sequence == 1
    assert client_commands(ran) == ["EVALSHA"]
    assert script_commands(ran) == ["HMGET", "GETRANGE", "GET"]


async def test_a_refused_token_costs_one_round_trip_and_reads_no_policy(lab: Lab) -> None:
    await enrolled(lab, "ep-ref", "token-ref")
    await poll_policy(lab.deps, "token-ref", "ep-ref", after=0, wait=0)
    async with monitored(lab.client) as ran:
        with pytest.raises(Exception, match="invalid agent token"):
            await poll_policy(lab.deps, "forged", "ep-ref", after=0, wait=0)
    assert client_commands(ran) == ["EVALSHA"]
    assert script_commands(ran) == ["HMGET"]


async def test_isolating_an_endpoint_adds_at_most_one_kib_of_enforcer_keys(lab: Lab) -> None:
    # A realistic fleet: many endpoints (so each bucket's delivery set is a real hash table).
    endpoints = [str(uuid.uuid4()) for _ in range(2000)]
    for endpoint_id in endpoints:
        await enrolled(lab, endpoint_id, f"token-{endpoint_id}")
    await store_policy_commands(lab.deps, [command(e, 1) for e in endpoints], NORMAL_LANE)
    for endpoint_id in endpoints[::2]:
        held = await lab.policies.held(endpoint_id)
        assert held is not None
        await lab.policies.record_delivery(endpoint_id, 1, held.policy_id, "applied")
    keys = lab.policies.keys

    async def usage(names: list[str]) -> int:
        pipe = lab.client.pipeline(transaction=False)
        for name in names:
            pipe.memory_usage(name, samples=0)
        return sum(int(n or 0) for n in await pipe.execute())

    n = len(endpoints)
    per_kind = {
        "agent": await usage([keys.agent(e) for e in endpoints]) / n,
        "policy": await usage([keys.policy(e) for e in endpoints]) / n,
        "delivery": await usage(
            [keys.delivery(t, s) for t in bucket_tags(TAG) for s in DELIVERY_STATES]
        )
        / n,
        "account-agents": await usage([keys.account_agents("acct-1")]) / n,
    }
    held = await lab.policies.held(endpoints[0])
    assert held is not None
    signed_len = len(held.signed_json)
    isolated = per_kind["policy"] + per_kind["delivery"]
    total = sum(per_kind.values())
    print(
        "\nenforcer bytes per isolated endpoint (MEMORY USAGE, "
        f"{n} endpoints, 3 allowlist peers, signed policy {signed_len} B): "
        + ", ".join(f"{k} {v:.0f}" for k, v in per_kind.items())
        + f"; isolation state {isolated:.0f}, with the agent record {total:.0f}"
    )
    # Stored once and compressed: header and the key's overhead included, less than the
    # signed bytes themselves.
    assert per_kind["policy"] < signed_len, per_kind
    # Issue 14 goal 5 counts what isolation adds (the agent record exists for every enrolled
    # endpoint, isolated or not, and is reported per agent).
    assert isolated <= 1024, per_kind
    assert per_kind["agent"] + per_kind["account-agents"] <= 450, per_kind


async def test_a_status_report_is_one_round_trip_after_the_token_check(lab: Lab) -> None:
    await enrolled(lab, "ep-rep", "token-rep")
    await store_policy_commands(lab.deps, [command("ep-rep", 1)], NORMAL_LANE)
    held = await lab.policies.held("ep-rep")
    assert held is not None
    identity = await authenticate_agent(lab.deps, "token-rep", "ep-rep")
    await lab.policies.record_delivery("ep-rep", 0, "warm-up", "failed")  # scripts loaded
    async with monitored(lab.client) as ran:
        await report_policy_status(
            lab.deps,
            identity,
            sequence=1,
            policy_id=held.policy_id,
            status="applied",
            rules_sha256="a" * 64,
            detail="",
        )
    assert client_commands(ran) == ["EVALSHA"]
    assert "GET" not in script_commands(ran), "the signed policy is not read"
    assert await lab.policies.delivery_counts() == {"pending": 0, "applied": 1, "failed": 0}


async def test_a_redis_that_forgot_the_scripts_is_sent_them_again(lab: Lab) -> None:
    await enrolled(lab, "ep-flush", "token-flush")
    await store_policy_commands(lab.deps, [command("ep-flush", 1)], NORMAL_LANE)
    await lab.client.script_flush()  # as a restarted or newly promoted node would be
    held = await poll_policy(lab.deps, "token-flush", "ep-flush", after=0, wait=0)
    assert held is not None and held.sequence == 1
    await lab.client.script_flush()
    assert await lab.policies.record_delivery("ep-flush", 1, held.policy_id, "applied")
    await lab.client.script_flush()
    stored = await store_policy_commands(lab.deps, [command("ep-flush", 2)], NORMAL_LANE)
    assert stored.stored == 1
