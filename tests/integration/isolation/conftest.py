"""The isolation service in-process on the real Kafka and Redis, with a harness to drive it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from services.isolation.bootstrap import build_app
from services.isolation.config import IsolationSettings
from shared.auth import mint_token
from shared.config import DEV_JWT_SECRET
from shared.kafka import make_producer, publish
from shared.messages import (
    Actor,
    AllowlistChanged,
    AllowlistEntry,
    EndpointRegistered,
    EnforcePolicy,
    Message,
    PolicyStatusReported,
)
from shared.redis import make_redis
from shared.topics import Topics
from tests.helpers import SECURITY, kafka_admin_options, read_topic, wait_for

SOC = Actor(sub="soc-analyst", role="soc")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the test Redis (its admin user where the test Redis has users)."""
    client = make_redis(redis_url, ca_file=SECURITY.redis_ca_file)
    try:
        yield client
    finally:
        await client.aclose()


class RecordingSettingsClient:
    """Stands in for the settings service's API (its own tests cover the real one)."""

    def __init__(self) -> None:
        self.disabled: list[str] = []

    async def disable_allowlist(self, account_id: str, requested_by: Actor) -> None:
        self.disabled.append(account_id)


class Harness:
    """Produces what settings and enforcer would, calls the REST API, reads the outputs."""

    def __init__(
        self, app: Any, http: httpx.AsyncClient, producer: Any, topics: Topics, bootstrap: str
    ) -> None:
        self.app = app
        self.http = http
        self.producer = producer
        self.topics = topics
        self.bootstrap = bootstrap
        self.settings_client: RecordingSettingsClient = app.state.settings_client
        self.versions: dict[str, int] = {}

    @staticmethod
    def token(role: str = "soc", account_id: str | None = None) -> dict[str, str]:
        tok = mint_token(DEV_JWT_SECRET, sub=f"{role}-user", role=role, account_id=account_id)  # type: ignore[arg-type]
        return {"Authorization": f"Bearer {tok}"}

    def partner(self, account_id: str) -> dict[str, str]:
        return self.token("partner", account_id)

    async def send(self, topic: str, key: str, message: Message) -> None:
        await publish(self.producer, topic, key, message)

    async def register(self, endpoint_id: str, account_id: str) -> None:
        await self.send(
            self.topics.endpoints,
            endpoint_id,
            EndpointRegistered(
                endpoint_id=endpoint_id,
                account_id=account_id,
                hostname=f"host-{endpoint_id}",
                platform="linux",
                enrolled_at=datetime.now(UTC),
            ),
        )

    def allowlist_event(
        self, account_id: str, addresses: Sequence[str | dict[str, Any]], *, enabled: bool = True
    ) -> AllowlistChanged:
        """Entries by address, or (allowlist v2) as ``{address, ports, protocol, expires_at}``."""
        version = self.versions.get(account_id, 0) + 1
        self.versions[account_id] = version
        now = datetime.now(UTC)
        return AllowlistChanged(
            account_id=account_id,
            enabled=enabled,
            version=version,
            updated_at=now,
            changed_by=SOC,
            entries=tuple(
                AllowlistEntry(
                    id=f"{account_id}-{a}",
                    name=f"RMM {a}",
                    address=a,
                    created_at=now,
                    created_by="x",
                )
                if isinstance(a, str)
                else AllowlistEntry.model_validate(
                    {
                        "id": f"{account_id}-{a['address']}",
                        "name": f"RMM {a['address']}",
                        "created_at": now,
                        "created_by": "x",
                        **a,
                    }
                )
                for a in addresses
            ),
        )

    async def set_allowlist(
        self, account_id: str, addresses: Sequence[str | dict[str, Any]], *, enabled: bool = True
    ) -> AllowlistChanged:
        """As the settings service does: the change is acknowledged once it is in Kafka."""
        event = self.allowlist_event(account_id, addresses, enabled=enabled)
        await self.send(self.topics.settings_allowlist, account_id, event)
        return event

    async def report(self, policy: Any, status: str = "applied", detail: str = "") -> None:
        await self.send(
            self.topics.isolation_status,
            policy.endpoint_id,
            PolicyStatusReported(
                endpoint_id=policy.endpoint_id,
                account_id=policy.account_id,
                policy_id=policy.policy_id,
                sequence=policy.sequence,
                status=status,  # type: ignore[arg-type]
                rules_sha256="d" * 64 if status == "applied" else None,
                detail=detail,
            ),
        )

    async def commands(
        self, expect: int | None = None, *, priority: bool = False
    ) -> list[EnforcePolicy]:
        topic = (
            self.topics.enforcer_commands_priority if priority else self.topics.enforcer_commands
        )
        return await read_topic(self.bootstrap, self.topics, topic, expect=expect, timeout=30)

    async def all_commands(self, expect: int) -> list[EnforcePolicy]:
        async def enough() -> list[EnforcePolicy] | None:
            found = await self.commands() + await self.commands(priority=True)
            return found if len(found) >= expect else None

        return await wait_for(enough, timeout=30, interval=0.2, message=f"{expect} commands")

    def processed(self, name: str) -> int:
        consumer = next(c for c in self.app.state.runtime.consumers if c.name == name)
        return int(consumer.processed)

    async def wait_processed(self, name: str, count: int) -> None:
        await wait_for(
            lambda: self.processed(name) >= count, timeout=30, message=f"{name} >= {count}"
        )

    async def state(self, endpoint_id: str) -> dict[str, Any]:
        response = await self.http.get(
            f"/v1/endpoints/{endpoint_id}/isolation", headers=self.token()
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@contextlib.asynccontextmanager
async def running_isolation(
    kafka_bootstrap: str,
    redis_url: str,
    topics: Topics,
    redis_prefix: str,
    *,
    settings_client: Any = None,
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The service's app with its lifespan running, and an HTTP client on it, once /ready."""
    connection: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        **SECURITY.service_settings("isolation", redis_url=redis_url),
    }
    settings = IsolationSettings(
        dev=True,
        topic_prefix=topics.prefix,
        redis_prefix=redis_prefix,
        platform_addresses=["198.51.100.1"],
        log_json=False,
        **connection,
    )
    client = settings_client or RecordingSettingsClient()
    app = build_app(settings, settings_client=client)
    app.state.settings_client = client
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://isolation") as http:

            async def ready() -> bool:
                return (await http.get("/ready")).status_code == 200

            await wait_for(ready, timeout=60, interval=0.2, message="isolation /ready")
            yield app, http


@pytest.fixture
async def h(
    kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> AsyncIterator[Harness]:
    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    try:
        async with running_isolation(kafka_bootstrap, redis_url, topics, redis_prefix) as (
            app,
            http,
        ):
            yield Harness(app, http, producer, topics, kafka_bootstrap)
    finally:
        await producer.stop()
