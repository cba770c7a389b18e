"""The isolation service on a 3-master Redis Cluster: every script in one slot, keys spread out."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

from shared.infra.redis_cluster import LocalRedisCluster
from shared.kafka import make_producer
from shared.messages import IsolateEndpoint, ReleaseEndpoint
from shared.topics import Topics
from tests.helpers import kafka_admin_options, wait_for
from tests.integration.isolation.conftest import SOC, Harness, running_isolation

pytestmark = pytest.mark.integration

ENDPOINTS = [f"ep-rc-{i:02d}" for i in range(24)]


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
async def hc(
    kafka_bootstrap: str, redis_cluster: LocalRedisCluster, topics: Topics, redis_prefix: str
) -> AsyncIterator[Harness]:
    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    try:
        async with running_isolation(kafka_bootstrap, redis_cluster.url, topics, redis_prefix) as (
            app,
            http,
        ):
            yield Harness(app, http, producer, topics, kafka_bootstrap)
    finally:
        await producer.stop()


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


async def test_isolate_release_and_account_strict_on_redis_cluster(
    hc: Harness, redis_cluster: LocalRedisCluster, redis_prefix: str
) -> None:
    await hc.set_allowlist("acct-rc", ["203.0.113.10"])
    for endpoint in ENDPOINTS:
        await hc.register(endpoint, "acct-rc")
    for endpoint in ENDPOINTS:
        await hc.send(
            hc.topics.isolation_requests,
            endpoint,
            IsolateEndpoint(endpoint_id=endpoint, mode="standard", requested_by=SOC),
        )
    standard = await hc.commands(expect=len(ENDPOINTS))
    assert all([e.address for e in c.policy.allowed_outbound] == ["203.0.113.10"] for c in standard)
    await hc.send(
        hc.topics.isolation_requests,
        ENDPOINTS[0],
        ReleaseEndpoint(endpoint_id=ENDPOINTS[0], requested_by=SOC),
    )

    async def active() -> list[str] | None:
        response = await hc.http.get("/v1/accounts/acct-rc/isolations", headers=hc.token())
        ids = sorted(e["endpoint_id"] for e in response.json()["endpoints"])
        return ids if ids == ENDPOINTS[1:] else None

    # The account's isolated set is gathered from every bucket (slot) it is split over.
    await wait_for(active, timeout=30, message="the released endpoint leaves the account's set")
    response = await hc.http.post(
        "/v1/accounts/acct-rc/strict-isolation",
        json={"reason": "RMM compromised", "disable_allowlist": True},
        headers=hc.partner("acct-rc"),
    )
    assert response.status_code == 202, response.text
    assert response.json()["endpoints"] == len(ENDPOINTS) - 1
    strict = await hc.commands(expect=len(ENDPOINTS) - 1, priority=True)
    assert sorted(c.policy.endpoint_id for c in strict) == ENDPOINTS[1:]
    assert all(c.policy.mode == "strict" and c.policy.sequence == 2 for c in strict)
    # The state lives on every master, not on one hot node.
    assert all(count > 0 for count in keys_per_node(redis_cluster, redis_prefix))


async def test_inventory_pages_and_timeline_on_redis_cluster(hc: Harness) -> None:
    for endpoint in ENDPOINTS[:7]:
        await hc.register(endpoint, "acct-inv-rc")
    await hc.register("ep-rc-other", "acct-inv-rc2")
    hosts: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        response = await hc.http.get(
            "/v1/accounts/acct-inv-rc/endpoints", params=params, headers=hc.token()
        )
        assert response.status_code == 200, response.text
        hosts += [i["hostname"] for i in response.json()["items"]]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert hosts == [f"host-{e}" for e in ENDPOINTS[:7]]
    await hc.send(
        hc.topics.isolation_requests,
        ENDPOINTS[0],
        IsolateEndpoint(endpoint_id=ENDPOINTS[0], mode="standard", requested_by=SOC),
    )
    (command,) = await hc.commands(expect=1)
    await hc.report(command.policy)

    async def applied() -> list[dict[str, object]] | None:
        response = await hc.http.get(
            f"/v1/endpoints/{ENDPOINTS[0]}/isolation/timeline", headers=hc.token()
        )
        items: list[dict[str, object]] = response.json()["items"]
        return items if items and items[0]["status"] == "applied" else None

    (item,) = await wait_for(applied, timeout=30, message="the timeline shows the applied policy")
    assert (item["sequence"], item["mode"]) == (1, "standard")
