"""Wake-ups and stores carry on when a Redis Cluster master dies and its replica takes over."""

from __future__ import annotations

import pytest
from redis.exceptions import RedisClusterException, RedisError

from services.enforcer.adapters.redis_store import RedisPolicyStore
from services.enforcer.adapters.wakeups import RedisPolicyWakeups
from services.enforcer.domain import NORMAL_LANE, StoreOutcome
from shared.infra.redis_cluster import LocalRedisCluster
from shared.redis import Keys, make_redis_cluster
from tests.helpers import wait_for
from tests.integration.enforcer.test_policy_store import item

pytestmark = pytest.mark.integration


async def test_wakeups_resubscribe_on_the_promoted_replica_after_a_master_dies() -> None:
    with LocalRedisCluster(masters=3, replicas=1) as cluster:
        client = make_redis_cluster(cluster.url)
        store = RedisPolicyStore(client, Keys("failover:"))
        hub = RedisPolicyWakeups(cluster.url, store.keys.wake_channels())
        await hub.start(timeout=30)
        try:
            assert hub.shards == 3
            endpoint = "ep-failover"
            # The client has learnt the topology (as a running service has): it knows the
            # replicas to ask once the URL's node is gone.
            assert await store.store_if_newer([item(endpoint, 1)], NORMAL_LANE) == [
                StoreOutcome.STORED
            ]
            victim = cluster.master_of(store.keys.wake(endpoint))
            cluster.stop_node(victim, kill=True)
            await wait_for(lambda: hub.subscriptions >= 2, timeout=40, message="resubscribed")
            assert hub.shards == 3, "the promoted replica serves the victim's channels"
            sequence = 1

            async def stored_and_woken() -> bool:
                nonlocal sequence
                sequence += 1
                with hub.waiter(endpoint) as waiter:
                    waiter.arm()
                    received = hub.wakeups_received
                    try:
                        outcome = await store.store_if_newer(
                            [item(endpoint, sequence)], NORMAL_LANE
                        )
                    # Until the client learns the new topology.
                    except (RedisError, RedisClusterException):
                        return False
                    assert outcome == [StoreOutcome.STORED]
                    return await waiter.wait(5) and hub.wakeups_received > received

            await wait_for(
                stored_and_woken, timeout=40, interval=0.5, message="woken after failover"
            )
            held = await store.held(endpoint)
            assert held is not None and held.sequence == sequence
        finally:
            await hub.stop()
            await client.aclose()
