"""SIGKILL the settings service mid-writes, restart it: the topic still rebuilds every account."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from shared.infra.proc import free_port
from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import ServiceProcess, read_topic
from tests.integration.settings.conftest import SOC
from tests.integration.settings.test_outbox_relay import assert_in_order_without_gaps

ACCOUNTS = ["acct-p1", "acct-p2", "acct-p3"]


async def _write_round(client: httpx.AsyncClient, url: str, i: int) -> list[int]:
    async def one(account: str) -> int:
        try:
            response = await client.post(
                f"{url}/v1/accounts/{account}/tooling-allowlist/entries",
                json={"name": f"RMM {i}", "address": f"10.8.{i}.1"},
                headers=SOC,
            )
        except httpx.HTTPError:
            return -1  # the process died under this request; Redis says whether it committed
        return response.status_code

    return list(await asyncio.gather(*(one(a) for a in ACCOUNTS)))


async def test_sigkill_during_writes_loses_and_reorders_nothing(
    service_env: dict[str, str], topics: Topics, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = {**service_env, "HOSTISO_RELAY_LEASE_MS": "1000", "HOSTISO_LOG_JSON": "0"}
    port = free_port()
    process = ServiceProcess("services.settings", env, port, tmp_path / "settings.log").start()
    try:
        await process.wait_ready()
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(8):
                statuses = await _write_round(client, process.url, i)
                assert set(statuses) == {201}
            # Kill while a round is in flight: between commit, publish and marking.
            in_flight = asyncio.create_task(_write_round(client, process.url, 8))
            await asyncio.sleep(0.005)  # not a sync point: lets the round reach the service
            process.kill()
            await in_flight
            process = ServiceProcess("services.settings", env, port, tmp_path / "again.log").start()
            await process.wait_ready()
            for i in range(9, 13):
                statuses = await _write_round(client, process.url, i)
                assert set(statuses) == {201}
            stored = {
                a: (
                    await client.get(
                        f"{process.url}/v1/accounts/{a}/tooling-allowlist", headers=SOC
                    )
                ).json()
                for a in ACCOUNTS
            }
    finally:
        process.stop()
    total = sum(s["version"] for s in stored.values())
    events: list[AllowlistChanged] = await read_topic(
        kafka_bootstrap, topics, topics.settings_allowlist, expect=total
    )
    newest = assert_in_order_without_gaps(events)
    for account in ACCOUNTS:
        assert newest[account].version == stored[account]["version"]
        assert [e.address for e in newest[account].entries] == [
            e["address"] for e in stored[account]["entries"]
        ]
