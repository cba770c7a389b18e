"""In-process enforcer apps on the real Kafka and Redis, and a minimal client that plays the agent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis

from services.enforcer.bootstrap import build_app
from services.enforcer.config import EnforcerSettings
from shared.config import DEV_ENROLLMENT_SECRET
from shared.enrollment import enrollment_key
from shared.infra.redis_cluster import LocalRedisCluster
from shared.kafka import make_producer, publish, wait_topics_ready
from shared.messages import AllowedPeer, EnforcePolicy, FrozenPolicy, utcnow
from shared.redis import RedisClient, make_redis, make_redis_cluster
from shared.topics import TOPIC_SPECS, Topics
from tests.helpers import SECURITY, kafka_admin_options


def policy_command(
    endpoint_id: str,
    sequence: int,
    *,
    mode: str = "standard",
    account_id: str = "acct-1",
    peers: int = 0,
) -> EnforcePolicy:
    policy = FrozenPolicy(
        policy_id=f"pol-{endpoint_id[:8]}-{sequence}",
        endpoint_id=endpoint_id,
        account_id=account_id,
        sequence=sequence,
        mode=mode,  # type: ignore[arg-type]
        allowed_outbound=tuple(
            AllowedPeer(name=f"tool {i}", address=f"203.0.113.{i + 1}") for i in range(peers)
        ),
        platform=("198.51.100.1",),
        settings_version=1,
        issued_at=utcnow(),
        issued_by="test",
        reason="test",
    )
    return EnforcePolicy(request_id=f"req-{endpoint_id}-{sequence}", policy=policy)


@dataclass
class AgentClient:
    """Plays the agent: bearer token on its own routes."""

    http: httpx.AsyncClient
    agent_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def poll(self, after: int = 0, wait: float = 0) -> httpx.Response:
        return await self.http.get(
            f"/v1/agents/{self.agent_id}/policy",
            params={"after": after, "wait": wait},
            headers=self.auth,
            timeout=wait + 30,
        )

    async def report(self, **body: Any) -> httpx.Response:
        return await self.http.post(
            f"/v1/agents/{self.agent_id}/policy-status", json=body, headers=self.auth
        )


async def enroll(http: httpx.AsyncClient, account_id: str = "acct-1") -> AgentClient:
    response = await http.post(
        "/v1/agents/enroll",
        json={
            "account_id": account_id,
            "enrollment_key": enrollment_key(DEV_ENROLLMENT_SECRET, account_id),
            "hostname": "web-01",
            "platform": "linux",
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return AgentClient(http, body["agent_id"], body["agent_token"])


@pytest.fixture
async def enforcer_settings(
    kafka_bootstrap: str, redis_url: str, topic_prefix: str, redis_prefix: str, topics: Topics
) -> Callable[..., EnforcerSettings]:
    # Fresh topics get their partition leaders a moment after creation; start once they have them.
    await wait_topics_ready(
        kafka_bootstrap, [topics(spec.name) for spec in TOPIC_SPECS], options=kafka_admin_options()
    )

    def make(**overrides: Any) -> EnforcerSettings:
        values: dict[str, Any] = {
            "dev": True,
            "kafka_bootstrap": kafka_bootstrap,
            "redis_url": redis_url,
            "topic_prefix": topic_prefix,
            "redis_prefix": redis_prefix,
            "log_json": False,
            **SECURITY.service_settings("enforcer", redis_url=redis_url),
            **overrides,
        }
        return EnforcerSettings.model_validate(values)

    return make


@contextlib.asynccontextmanager
async def running_enforcer(
    settings: EnforcerSettings,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = build_app(settings)
    async with LifespanManager(app, startup_timeout=90, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://enforcer") as http:
            yield app, http


@pytest.fixture
async def enforcer(
    enforcer_settings: Callable[..., EnforcerSettings],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with running_enforcer(enforcer_settings()) as running:
        yield running


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[Any]:
    prod = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await prod.start()
    try:
        yield prod
    finally:
        await prod.stop()


async def send_command(producer: Any, topic: str, command: EnforcePolicy) -> None:
    await publish(producer, topic, command.policy.endpoint_id, command)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A 3-master Redis Cluster of the enforcer tests (plain, no ACL), shared by the session."""
    with LocalRedisCluster(masters=3) as cluster:
        yield cluster


@dataclass
class Backend:
    """A Redis the stores run on: the session's single server or the 3-master cluster."""

    name: str
    client: RedisClient
    url: str
    ca_file: str | None


@contextlib.asynccontextmanager
async def open_backend(request: pytest.FixtureRequest, name: str) -> AsyncIterator[Backend]:
    """A client on the session's Redis (``redis``) or on the session's cluster (``cluster``)."""
    if name == "redis":
        url, ca_file = request.getfixturevalue("redis_url"), SECURITY.redis_ca_file
        client: RedisClient = make_redis(url, ca_file=ca_file)
    else:
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        url, ca_file = cluster.url, None
        client = make_redis_cluster(url)
    try:
        yield Backend(name, client, url, ca_file)
    finally:
        await client.aclose()
        if isinstance(client, Redis):
            await client.connection_pool.disconnect()


@pytest.fixture(params=["redis", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with open_backend(request, request.param) as opened:
        yield opened
