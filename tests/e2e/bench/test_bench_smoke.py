"""The bench and the chaos run end to end at tiny sizes on real Kafka, Redis and service processes."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest

from bench.chaos import ChaosSizes, run_chaos
from bench.figures import BenchSizes, run_bench
from bench.report import bench_table, chaos_table

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def quiet_kafka_clients() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


async def test_reduced_bench_reports_every_figure() -> None:
    with tempfile.TemporaryDirectory(prefix="hostiso-bench-test-", dir="/dev/shm") as tmp:
        report = await run_bench(Path(tmp), BenchSizes.tiny())
    print(bench_table(report))
    assert report["throughput"]["requests"] > 0
    assert report["throughput"]["ratio"] > 0
    # 30 pipeline agents at 20 per process: the agent side is not one Python process.
    assert report["throughput"]["pipeline_agent_processes"] == 2
    assert any(
        name.startswith("agents:acct-bench") for name in report["throughput"]["cpu_s_by_process"]
    )
    assert report["latency"]["samples"] > 0
    for case in ("idle", "priority_lane_under_backlog", "single_fifo_lane_under_backlog"):
        assert report["priority"][case]["samples"] == BenchSizes.tiny().strict_samples
    assert report["account_strict"]["endpoints_per_s"] > 0
    assert report["revoke"]["endpoints"] == BenchSizes.tiny().revoke_endpoints
    assert report["revoke"]["endpoints_counted_by_202"] == BenchSizes.tiny().revoke_endpoints
    assert report["revoke"]["revoke_to_last_agent_applied_s"] > 0
    assert report["fanout"]["delivery_large"]["samples"] > 0
    assert report["fanout"]["enforcer_rss_mib_large"] > 0
    assert report["footprint"]["bytes_per_isolated_endpoint"] > 0
    assert report["footprint"]["bytes_per_account_allowlist"] > 0
    # Issue 14's fields.
    assert report["throughput"]["control_plane_cpu_ms_per_isolation"] > 0
    assert report["throughput"]["bare_relay_cpu_ms_per_message"] > 0
    assert report["throughput"]["agents_cpu_ms_per_applied_policy"] > 0
    strict = report["account_strict"]
    assert 0 < strict["applied_50pct_s"] <= strict["applied_99pct_s"] <= strict["applied_100pct_s"]
    assert report["footprint"]["bytes_per_isolated_endpoint_by_kind"]["enforcer:policy"] > 0
    assert "isolation:state" in report["footprint"]["by_kind"]
    # Every agent of every group enrolled; the wall time of each phase (CI planning).
    tiny = BenchSizes.tiny()
    assert report["enrollment"]["acct-strict"]["agents"] == tiny.account_endpoints
    assert report["enrollment"]["acct-strict"]["all_enrolled_s"] > 0
    assert "fig 3: priority under backlog" in report["phases_s"]
    assert sum(report["phases_s"].values()) <= report["wall_s"] + 1


async def test_reduced_chaos_loses_nothing_and_delivers_nothing_wrong() -> None:
    with tempfile.TemporaryDirectory(prefix="hostiso-chaos-test-", dir="/dev/shm") as tmp:
        report = await run_chaos(Path(tmp), ChaosSizes.tiny())
    print(chaos_table(report))
    assert len(report["scenarios"]) == 4
    for scenario in report["scenarios"]:
        assert scenario["accepted"] > 0, scenario
        assert (scenario["lost"], scenario["wrong"], scenario["duplicates"]) == (0, 0, 0), scenario
        assert scenario.get("failures", 0) == 0, scenario
