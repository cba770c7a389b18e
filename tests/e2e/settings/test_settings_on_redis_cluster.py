"""The settings service process started against a redis+cluster:// URL: ready, writes published."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.infra.proc import free_port
from shared.infra.redis_cluster import LocalRedisCluster
from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import ServiceProcess, read_topic
from tests.integration.settings.conftest import SOC


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(masters=3) as cluster:
        yield cluster


async def test_settings_process_on_redis_cluster_is_ready_and_publishes_its_writes(
    service_env: dict[str, str],
    redis_cluster: LocalRedisCluster,
    topics: Topics,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    env = {
        **service_env,
        "HOSTISO_REDIS_URL": redis_cluster.url,
        "HOSTISO_LOG_JSON": "0",
    }
    process = ServiceProcess("services.settings", env, free_port(), tmp_path / "settings.log")
    process.start()
    try:
        await process.wait_ready()
        async with httpx.AsyncClient(timeout=30) as client:
            ready = await client.get(f"{process.url}/ready")
            assert ready.status_code == 200, ready.text
            for i, account in enumerate(["acct-c1", "acct-c2", "acct-c3"]):
                response = await client.post(
                    f"{process.url}/v1/accounts/{account}/tooling-allowlist/entries",
                    json={"name": f"RMM {i}", "address": f"10.12.0.{i + 1}"},
                    headers=SOC,
                )
                # 201: the event is in Kafka (read-your-writes holds on the cluster too).
                assert response.status_code == 201, response.text
    finally:
        process.stop()
    events: list[AllowlistChanged] = await read_topic(
        kafka_bootstrap, topics, topics.settings_allowlist, expect=3
    )
    assert sorted(e.account_id for e in events) == ["acct-c1", "acct-c2", "acct-c3"]
