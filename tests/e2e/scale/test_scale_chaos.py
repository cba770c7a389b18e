"""The scale scenario, reduced: 2 isolation + 2 enforcer instances, 3 brokers, Redis Cluster.

SIGKILL of an isolation and of an enforcer instance, then of a Redis Cluster master (its replica
promoted), while isolations, releases, allowlist entries and an account-wide strict flow: nothing
accepted is lost, no agent holds a wrong policy, no request issued two sequences.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest

from bench.chaos import ChaosSizes, run_scale, scale_summary
from bench.report import chaos_table

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def quiet_kafka_clients() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


async def test_instances_killed_and_a_redis_master_lost_under_load_lose_nothing() -> None:
    sizes = ChaosSizes.scale_test()
    with tempfile.TemporaryDirectory(prefix="hostiso-scale-test-", dir="/dev/shm") as tmp:
        result = await run_scale(Path(tmp), sizes)
    print(chaos_table({"scenarios": result["steps"]}))
    print(scale_summary(result["scale"]))
    scale = result["scale"]
    assert scale["brokers"] == 3
    assert scale["redis_cluster_nodes"] == 6 and scale["redis_cluster_masters"] == 3
    assert scale["instances_max"] == {"settings": 1, "isolation": 2, "enforcer": 2}
    assert scale["kills"] == {
        "service_instances": {"isolation": 1, "enforcer": 1},
        "broker_leader": 0,
        "redis_master": 1,
    }
    assert [s["scenario"] for s in result["steps"]] == [
        "scale: SIGKILL + restart an instance of each service",
        "scale: SIGKILL a Redis master (replica promoted)",
    ]
    for step in result["steps"]:
        assert step["requests"] > 0, step
        # Every step also strictly isolated the strict account: all its endpoints covered.
        assert step["account_stricts"] == {"acct-chaos-s": sizes.strict_agents}, step
        assert (step["lost"], step["wrong"], step["duplicates"]) == (0, 0, 0), step
        assert step["unsettled_endpoints"] == 0, step
