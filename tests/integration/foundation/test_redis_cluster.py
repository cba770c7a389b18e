"""The local Redis Cluster: slots served, one-slot scripts run, CROSSSLOT refused, failover survived."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from shared.infra.redis_cluster import LocalRedisCluster
from shared.redis import is_cluster_url, make_redis_cluster
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

SAME_SLOT = ["{acct-1}:state", "{acct-1}:version"]


async def test_three_masters_with_replicas_serve_scripts_and_survive_a_master_kill() -> None:
    with LocalRedisCluster(masters=3, replicas=1) as cluster:
        assert is_cluster_url(cluster.url)
        client = make_redis_cluster(cluster.url)
        try:
            for i in range(50):
                await client.set(f"key-{i}", str(i))
            script = client.register_script(
                "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])"
            )
            assert await script(keys=SAME_SLOT, args=["on"]) == 1
            with pytest.raises((ResponseError, RedisClusterException)):
                await script(keys=["{acct-1}:state", "{acct-2}:state"], args=["x"])
            victim = cluster.master_of("{acct-1}:state")
            # What the replica has acknowledged survives the kill (replication is asynchronous:
            # a write the replica has not yet got dies with its master, on any Redis Cluster).
            await asyncio.to_thread(cluster.wait_replicated, victim)
            cluster.stop_node(victim, kill=True)

            async def served_again() -> bool:
                try:
                    return await script(keys=SAME_SLOT, args=["after"]) == 2
                except RedisError:  # connection errors until the replica is promoted
                    return False

            # The replica of the killed master is promoted (node timeout 2 s) and the script,
            # reloaded by the client on the new master, runs again with the data it had.
            await wait_for(served_again, timeout=30, interval=0.5, message="failover")
            assert await client.get("{acct-1}:state") == b"after"
            assert [await client.get(f"key-{i}") for i in range(50)] == [
                str(i).encode() for i in range(50)
            ]
            cluster.start_node(victim)
            cluster.wait_healthy()
        finally:
            await client.aclose()
