"""Fixtures: the settings app built with ``build_app`` and driven in-process on the real stack."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from services.settings.bootstrap import build_app
from services.settings.config import SettingsServiceSettings
from shared.auth import mint_token
from shared.config import DEV_JWT_SECRET
from shared.infra.redis_cluster import LocalRedisCluster
from shared.kafka import ensure_topics
from shared.kafka_acls import provision_acls
from shared.messages import Role
from shared.topics import Topics
from tests.helpers import SECURITY, kafka_admin_options


def token(
    role: Role,
    account_id: str | None = None,
    sub: str = "tester",
    # Module-level tokens (SOC below) are minted at collection: they must outlive a full run of
    # the suite (over 10 minutes on a loaded machine); 1 h is the maximum for the service role.
    ttl: int = 3600,
    scopes: tuple[str, ...] = (),
) -> str:
    return mint_token(
        DEV_JWT_SECRET, sub=sub, role=role, account_id=account_id, ttl_s=ttl, scopes=scopes
    )


def bearer(
    role: Role, account_id: str | None = None, sub: str = "tester", scopes: tuple[str, ...] = ()
) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, account_id, sub, scopes=scopes)}"}


SOC = bearer("soc", sub="soc-analyst")


@dataclass
class SettingsApp:
    """A running in-process settings service and a client for it."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: SettingsServiceSettings
    topics: Topics

    def url(self, account_id: str, suffix: str = "") -> str:
        return f"/v1/accounts/{account_id}/tooling-allowlist{suffix}"

    async def add(
        self, account_id: str, name: str, address: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post(
            self.url(account_id, "/entries"),
            json={"name": name, "address": address},
            headers=headers or SOC,
        )


SettingsFactory = Callable[..., SettingsServiceSettings]


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A 3-master Redis Cluster (no replicas, no ACL users) shared by the settings tests."""
    with LocalRedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture(params=["redis", "redis-cluster"])
def any_redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The session's single Redis, then a real Redis Cluster: the same test runs on both."""
    if request.param == "redis":
        return redis_url
    cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
    return cluster.url


@pytest.fixture
def make_settings(
    kafka_bootstrap: str, redis_url: str, topic_prefix: str, redis_prefix: str, topics: Topics
) -> SettingsFactory:
    # ``topics``: created as admin; the settings principal may not create topics itself.
    def factory(**overrides: Any) -> SettingsServiceSettings:
        values: dict[str, Any] = {
            "dev": True,
            "kafka_bootstrap": kafka_bootstrap,
            "redis_url": redis_url,
            "topic_prefix": topic_prefix,
            "redis_prefix": redis_prefix,
            "relay_lease_ms": 1000,
            "log_json": False,
            **SECURITY.service_settings("settings", redis_url=redis_url),
        }
        values.update(overrides)
        return SettingsServiceSettings(**values)

    return factory


@contextlib.asynccontextmanager
async def running_app(settings: SettingsServiceSettings) -> AsyncIterator[SettingsApp]:
    """``build_app`` + lifespan + an httpx client over ASGI, torn down on exit."""
    app = build_app(settings)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://settings.test", timeout=30
        ) as client:
            yield SettingsApp(app, client, settings, Topics(settings.topic_prefix))


@pytest.fixture
async def settings_app(
    make_settings: SettingsFactory, topics: Topics
) -> AsyncIterator[SettingsApp]:
    async with running_app(make_settings()) as running:
        yield running


@pytest.fixture(scope="module")
async def module_app(kafka_bootstrap: str, redis_url: str) -> AsyncIterator[SettingsApp]:
    """One app (own topic and key prefixes) shared by a module's table-driven tests."""
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        **SECURITY.service_settings("settings", redis_url=redis_url),
    }
    settings = SettingsServiceSettings(
        dev=True,
        topic_prefix=f"m{suffix}.",
        redis_prefix=f"m{suffix}:",
        relay_lease_ms=1000,
        log_json=False,
        **values,
    )
    admin = kafka_admin_options()
    await ensure_topics(kafka_bootstrap, Topics(settings.topic_prefix), options=admin)
    if admin:
        await provision_acls(kafka_bootstrap, Topics(settings.topic_prefix), options=admin)
    async with running_app(settings) as running:
        yield running
