"""No poison, no silent stall (guarantee 12) through the real isolation service, Kafka and Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.partitioner import DefaultPartitioner

from services.isolation.adapters.settings_client import HttpSettingsClient
from shared.config import DEV_JWT_SECRET
from shared.infra import LocalRedis
from shared.kafka import make_producer, publish
from shared.messages import DeadLetter, StrictIsolateAccount
from shared.topics import Topics
from tests.helpers import kafka_admin_options, read_topic, wait_for
from tests.integration.isolation.conftest import SOC, Harness, running_isolation


class SettingsApi:
    """The settings service's PATCH, answered in memory behind the real HttpSettingsClient.

    The real client builds the URL from the account id, so an id with a control character
    fails the way it does in production (httpx.InvalidURL, which is not an httpx.HTTPError).
    """

    def __init__(self) -> None:
        self.disabled: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.disabled.append(request.url.path.split("/")[3])
        return httpx.Response(200, json={})


@pytest.fixture
async def real_client_h(
    kafka_bootstrap: str, redis_url: str, topics: Topics, redis_prefix: str
) -> AsyncIterator[tuple[Harness, SettingsApi]]:
    api = SettingsApi()
    client = HttpSettingsClient(
        "http://settings", DEV_JWT_SECRET, transport=httpx.MockTransport(api.handler)
    )
    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    try:
        async with running_isolation(
            kafka_bootstrap, redis_url, topics, redis_prefix, settings_client=client
        ) as (app, http):
            yield Harness(app, http, producer, topics, kafka_bootstrap), api
    finally:
        await producer.stop()


async def test_an_account_id_with_a_control_character_is_refused_naming_the_field_and_rule(
    h: Harness,
) -> None:
    for bad in ("acct-1%0A", "acct%201", "%09acct", "a" * 129):
        response = await h.http.post(
            f"/v1/accounts/{bad}/strict-isolation", json={}, headers=h.token()
        )
        assert response.status_code == 422, (bad, response.text)
        (error,) = response.json()["errors"]
        assert error["field"] == "path.account_id"
        assert "pattern" in error["message"]
    response = await h.http.post(
        "/v1/endpoints/ep-1%0A/isolation", json={"mode": "standard"}, headers=h.token()
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "path.endpoint_id"


async def test_a_poison_strict_request_is_dead_lettered_and_later_ones_on_its_partition_handled(
    real_client_h: tuple[Harness, SettingsApi],
) -> None:
    h, api = real_client_h
    priority = h.topics.isolation_requests_priority
    partitioner = DefaultPartitioner()
    poison = "acct-1\n"
    target = partitioner(poison.encode(), [0, 1, 2], [0, 1, 2])
    later = next(
        a
        for a in (f"acct-{uuid.uuid4().hex[:8]}" for _ in range(1000))
        if partitioner(a.encode(), [0, 1, 2], [0, 1, 2]) == target
    )
    # As a client bypassing today's REST check would have put it there (the API refuses it now).
    await publish(
        h.producer,
        priority,
        poison,
        StrictIsolateAccount(account_id=poison, reason="rmm", requested_by=SOC),
    )
    await publish(
        h.producer,
        priority,
        later,
        StrictIsolateAccount(account_id=later, reason="rmm", requested_by=SOC),
    )

    await wait_for(lambda: later in api.disabled, timeout=60, message="the later strict handled")
    letters: list[DeadLetter] = await read_topic(h.bootstrap, h.topics, h.topics.dlq, expect=1)
    (letter,) = [x for x in letters if x.source_topic == priority]
    assert letter.source_partition == target
    assert letter.key == "acct-1\\n"  # escaped, so the letter is printable
    assert "failed 5 times" in letter.reason and "InvalidURL" in letter.reason
    runtime = h.app.state.runtime
    lane = next(c for c in runtime.consumers if c.name == "requests-priority")
    assert lane.stats.dead_letters == 1
    assert all(entry.restarts == 0 for entry in runtime.supervisor.tasks.values())
    metrics = (await h.http.get("/metrics")).text
    assert 'hostiso_consumer_dead_letters_total{consumer="requests-priority"} 1.0' in metrics
    assert (
        'hostiso_consumer_retries_total{consumer="requests-priority",kind="error"} 4.0' in metrics
    )


async def test_isolation_recovers_from_a_redis_outage_and_ready_says_so_meanwhile(
    kafka_bootstrap: str, topics: Topics, redis_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "redis").mkdir()
    redis = LocalRedis(appendfsync="always", workdir=tmp_path / "redis").start()
    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    try:
        async with running_isolation(kafka_bootstrap, redis.url, topics, redis_prefix) as (
            app,
            http,
        ):
            h = Harness(app, http, producer, topics, kafka_bootstrap)
            await h.set_allowlist("acct-r", ["203.0.113.7"])
            await h.register("ep-before", "acct-r")
            response = await http.post(
                "/v1/endpoints/ep-before/isolation", json={"mode": "standard"}, headers=h.token()
            )
            assert response.status_code == 202
            await wait_for(
                lambda: _state(h, "ep-before"), timeout=30, message="isolation before the outage"
            )

            redis.stop(kill=True)

            async def not_ready() -> bool:
                return (await http.get("/ready")).status_code == 503

            await wait_for(not_ready, timeout=30, message="/ready false while Redis is down")
            # Events the replicas must store while Redis is away: they fail, and must be retried.
            await h.register("ep-during", "acct-r")
            await h.set_allowlist("acct-r", ["203.0.113.8"])
            await wait_for(
                lambda: _replica_retrying(app), timeout=30, message="replica retrying on Redis"
            )

            redis.start()

            async def ready() -> bool:
                return (await http.get("/ready")).status_code == 200

            await wait_for(ready, timeout=60, message="/ready true after Redis is back")
            response = await http.post(
                "/v1/endpoints/ep-during/isolation", json={"mode": "standard"}, headers=h.token()
            )
            assert response.status_code == 202, response.text

            async def isolated() -> dict[str, Any] | None:
                body = await h.state("ep-during")
                return body if body["policy"] is not None else None

            body = await wait_for(isolated, timeout=60, message="standard isolation after")
            addresses = {entry["address"] for entry in body["policy"]["allowed_outbound"]}
            assert addresses == {"203.0.113.8"}  # the allowlist change made during the outage
    finally:
        await producer.stop()
        redis.close()


async def _state(h: Harness, endpoint_id: str) -> bool:
    response = await h.http.get(f"/v1/endpoints/{endpoint_id}/isolation", headers=h.token())
    return response.status_code == 200 and response.json()["policy"] is not None


def _replica_retrying(app: Any) -> bool:
    # The registry's consume loop saw the outage (without a loop, nothing to wait for).
    loop = getattr(app.state.service._registry.replica, "loop", None)
    return loop is None or loop.stats.retries["transient"] > 0
