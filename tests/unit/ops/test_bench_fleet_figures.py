"""The fleet-scale figures of ``make bench`` (issue 14): percentiles, CPU per unit, RSS slope, key kinds."""

from __future__ import annotations

import pytest

from bench.figures import cpu_per_unit, fleet_applied_times, key_kind_parts, per_agent_rss_kib
from bench.report import bench_table


def test_fleet_times_are_when_half_most_and_all_agents_had_applied() -> None:
    sent = 1000.0
    applied = [sent + t for t in [0.5 * i for i in range(1, 201)]]  # 0.5 s .. 100 s
    times = fleet_applied_times(applied, sent)
    assert times == {"applied_50pct_s": 50.0, "applied_99pct_s": 99.0, "applied_100pct_s": 100.0}


def test_fleet_times_of_one_agent_and_of_none() -> None:
    assert fleet_applied_times([12.25], 10.0) == {
        "applied_50pct_s": 2.25,
        "applied_99pct_s": 2.25,
        "applied_100pct_s": 2.25,
    }
    assert fleet_applied_times([], 10.0)["applied_100pct_s"] == 0.0


def test_control_plane_cpu_counts_services_broker_and_redis_but_not_agents() -> None:
    before = {"enforcer": 1.0, "isolation": 1.0, "kafka broker(s)": 2.0, "agents:a(1 in 1)": 5.0}
    after = {
        "enforcer": 2.0,
        "isolation": 1.5,
        "settings": 0.1,
        "kafka broker(s)": 3.0,
        "redis": 0.4,
        "agents:a(1 in 1)": 6.0,
        "bench driver": 9.0,
    }
    figures = cpu_per_unit(before, after, 1000)
    assert figures["control_plane_cpu_ms"] == pytest.approx(3.0)
    assert figures["agents_cpu_ms"] == pytest.approx(1.0)
    assert figures["by_process_cpu_ms"]["bench driver"] == pytest.approx(9.0)


def test_rss_per_agent_is_the_slope_not_the_interpreter() -> None:
    interpreter = 40_000
    samples = [(n, interpreter + 18 * n) for n in (10, 75, 75, 100, 100)]
    assert per_agent_rss_kib(samples) == pytest.approx(18.0)


def test_rss_per_agent_needs_two_process_sizes() -> None:
    assert per_agent_rss_kib([(100, 50_000), (100, 51_000)]) is None
    assert per_agent_rss_kib([(0, 0), (10, 41_000)]) is None


def test_a_hash_tagged_cluster_key_groups_by_its_kind() -> None:
    assert key_kind_parts("isolation:{iso07}:state:ep-1")[:2] == ["isolation", "state"]
    assert key_kind_parts("settings:{set09}:allowlist:acct:history") == [
        "settings",
        "allowlist",
        "acct",
        "history",
    ]
    assert key_kind_parts("enforcer:policy:ep-2")[:2] == ["enforcer", "policy"]


def test_the_printed_table_carries_the_fleet_fields() -> None:
    latency = {"p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0, "samples": 3}
    report = {
        "throughput": {
            "requests_per_s": 400.0,
            "requests": 5000,
            "baseline_bare_relay_msgs_per_s": 10000.0,
            "ratio": 0.04,
            "control_plane_cpu_ms_per_isolation": 2.5,
            "bare_relay_cpu_ms_per_message": 0.05,
            "bare_relay_cpu_ms_per_message_with_broker": 0.09,
            "agents_cpu_ms_per_applied_policy": 0.4,
        },
        "agents": {"rss_kib_per_idle_agent": 17.5},
        "latency": {**latency, "offered_per_s": 100.0},
        "priority": {
            "idle": latency,
            "backlog": 10,
            "priority_lane_under_backlog": latency,
            "normal_lag_when_strict_sent": 1,
            "normal_lag_after_last_strict": 0,
            "ratio_p99_backlog_vs_idle": 1.0,
            "single_fifo_lane_under_backlog": latency,
        },
        "account_strict": {
            "endpoints": 10,
            "strict_all_held_s": 1.0,
            "endpoints_per_s": 10.0,
            "ratio_vs_pipeline_throughput": 0.1,
            "applied_50pct_s": 0.4,
            "applied_99pct_s": 0.9,
            "applied_100pct_s": 1.0,
        },
        "fanout": {
            "agents_small": 1,
            "agents_large": 2,
            "delivery_small": latency,
            "delivery_large": latency,
            "enforcer_rss_mib_small": 1.0,
            "enforcer_rss_mib_large": 1.0,
            "ratio_p99_large_vs_small": 1.0,
        },
        "footprint": {
            "isolated_endpoints": 10,
            "bytes_per_isolated_endpoint": 900,
            "bytes_per_request_outcome": 100,
            "bytes_per_enrolled_agent": 600,
            "entries_per_allowlist": 5,
            "bytes_per_account_allowlist": 1000,
            "by_kind": {"enforcer:policy": {"keys": 10, "bytes": 6000}},
            "bytes_per_isolated_endpoint_by_kind": {"enforcer:policy": 600},
        },
        "enrollment": {
            "acct-strict": {
                "agents": 10_000,
                "all_enrolled_s": 120.0,
                "agents_per_s": 83.3,
                "enroll_concurrency_per_process": 10,
                "orphan_endpoints": 3,
            }
        },
        "phases_s": {"enroll the pipeline and account agents": 120.0},
        "wall_s": 900.0,
    }
    out = bench_table(report)
    assert "enrollment of 10,000 agents of acct-strict (s)" in out
    assert "3 orphan endpoints" in out
    assert "Wall seconds per phase (900.0 s in all)" in out
    assert "control-plane CPU ms per isolation (goal ≤ 3)" in out
    assert "0.05 / 0.09" in out
    assert "0.4 / 0.9 / 1.0" in out
    assert "RSS KiB per idle agent" in out
    assert "enforcer:policy" in out
