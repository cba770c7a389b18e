"""Writing the JSON report and printing readable tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def bench_table(report: dict[str, Any]) -> str:
    t, lat, pr, acct, fan, fp = (
        report["throughput"],
        report["latency"],
        report["priority"],
        report["account_strict"],
        report["fanout"],
        report["footprint"],
    )
    rows = [
        (
            "1 pipeline throughput (req/s, request → agent applied)",
            t["requests_per_s"],
            f"{t['requests']} requests",
        ),
        ("1 bare aiokafka relay, same broker (msg/s)", t["baseline_bare_relay_msgs_per_s"], ""),
        ("1 ratio pipeline / relay (goal ≥ 0.4)", t["ratio"], ""),
        *(
            [
                (
                    "1 control-plane CPU ms per isolation (goal ≤ 3)",
                    t["control_plane_cpu_ms_per_isolation"],
                    "settings+isolation+enforcer+broker+Redis",
                ),
                (
                    "1 bare relay CPU ms per message (client / + broker)",
                    f"{t['bare_relay_cpu_ms_per_message']} / "
                    f"{t['bare_relay_cpu_ms_per_message_with_broker']}",
                    "same run",
                ),
                (
                    "1 simulated agents CPU ms per applied policy (goal ≤ 0.5)",
                    t["agents_cpu_ms_per_applied_policy"],
                    "",
                ),
            ]
            if "control_plane_cpu_ms_per_isolation" in t
            else []
        ),
        *(
            [
                (
                    "1 simulated agent RSS KiB per idle agent (goal ≤ 20)",
                    report["agents"]["rss_kib_per_idle_agent"],
                    "slope over the agent processes",
                )
            ]
            if "agents" in report
            else []
        ),
        (
            f"2 latency p50 / p95 / p99 ms at {lat['offered_per_s']} req/s",
            f"{lat['p50_ms']} / {lat['p95_ms']} / {lat['p99_ms']}",
            f"{lat['samples']} samples",
        ),
        ("3 strict p99 ms, idle lanes", pr["idle"]["p99_ms"], f"{pr['idle']['samples']} samples"),
        (
            f"3 strict p99 ms, {pr['backlog']:,} normal backlogged (priority lane)",
            pr["priority_lane_under_backlog"]["p99_ms"],
            f"lag {pr['normal_lag_when_strict_sent']:,} → {pr['normal_lag_after_last_strict']:,}",
        ),
        ("3 ratio backlog / idle (goal ≤ 2)", pr["ratio_p99_backlog_vs_idle"], ""),
        (
            "3 strict p99 ms, single FIFO lane behind the backlog",
            pr["single_fifo_lane_under_backlog"]["p99_ms"],
            "baseline",
        ),
        (
            f"4 account-wide strict of {acct['endpoints']:,} endpoints (s)",
            acct["strict_all_held_s"],
            f"{acct['endpoints_per_s']} endpoints/s",
        ),
        *(
            [
                (
                    "4 account-wide strict: 50 % / 99 % / 100 % applied (s)",
                    f"{acct['applied_50pct_s']} / {acct['applied_99pct_s']} / "
                    f"{acct['applied_100pct_s']}",
                    "goal: 100 % ≤ 15 s at 10,000",
                )
            ]
            if "applied_100pct_s" in acct
            else []
        ),
        ("4 ratio endpoints/s vs figure 1", acct["ratio_vs_pipeline_throughput"], ""),
        *(
            [
                (
                    f"4 revoke an entry from {report['revoke']['endpoints']:,} isolated endpoints"
                    " (s, request → last agent applied)",
                    report["revoke"]["revoke_to_last_agent_applied_s"],
                    f"202 in {report['revoke']['accepted_202_s']} s, "
                    f"counted {report['revoke']['endpoints_counted_by_202']}",
                )
            ]
            if "revoke" in report
            else []
        ),
        (
            f"5 delivery p99 ms, {fan['agents_small']} agents waiting",
            fan["delivery_small"]["p99_ms"],
            f"RSS {fan['enforcer_rss_mib_small']} MiB",
        ),
        (
            f"5 delivery p99 ms, {fan['agents_large']:,} agents waiting",
            fan["delivery_large"]["p99_ms"],
            f"RSS {fan['enforcer_rss_mib_large']} MiB",
        ),
        ("5 ratio large / small", fan["ratio_p99_large_vs_small"], ""),
        (
            "6 Redis bytes per isolated endpoint",
            fp["bytes_per_isolated_endpoint"],
            f"+ {fp['bytes_per_request_outcome']} B per request outcome (24 h TTL)",
        ),
        ("6 Redis bytes per enrolled agent", fp["bytes_per_enrolled_agent"], ""),
        (
            f"6 Redis bytes per account allowlist ({fp['entries_per_allowlist']} entries)",
            fp["bytes_per_account_allowlist"],
            "incl. history + replica",
        ),
    ]
    for account, group in report.get("enrollment", {}).items():
        rows.append(
            (
                f"enrollment of {group['agents']:,} agents of {account} (s)",
                group["all_enrolled_s"],
                f"{group['agents_per_s']}/s, {group['enroll_concurrency_per_process']} in flight"
                f" per process, {group['orphan_endpoints']} orphan endpoints",
            )
        )
    out = table(("figure", "value", "note"), rows)
    phases = report.get("phases_s")
    if phases:
        out += f"\n\nWall seconds per phase ({report.get('wall_s', '?')} s in all)\n"
        out += table(("phase", "s"), list(phases.items()))
    cpu = t.get("cpu_s_by_process")
    if cpu:
        out += (
            f"\n\nCPU seconds per process during figure 1 ({t['seconds']} s wall; "
            f"{t.get('pipeline_agents', '?')} pipeline agents in "
            f"{t.get('pipeline_agent_processes', '?')} processes)\n"
        )
        out += table(("process", "cpu s"), sorted(cpu.items(), key=lambda kv: -kv[1]))
    per_kind = fp.get("bytes_per_isolated_endpoint_by_kind")
    if per_kind:
        out += (
            f"\n\nRedis bytes per isolated endpoint by kind ({fp['isolated_endpoints']} isolated;"
            " goal ≤ 1,024 in total for the endpoint's own kinds)\n"
        )
        out += table(
            ("kind", "bytes / isolated endpoint", "keys"),
            [
                (kind, per, fp["by_kind"][kind]["keys"])
                for kind, per in sorted(per_kind.items(), key=lambda kv: -kv[1])
            ],
        )
    hops = t.get("hops")
    if hops:
        out += "\n\nWhere figure 1's time goes (per request)\n"
        out += table(
            ("hop", "p50 ms", "p95 ms", "p99 ms"),
            [(name, h["p50_ms"], h["p95_ms"], h["p99_ms"]) for name, h in hops.items()],
        )
    return out


def chaos_table(report: dict[str, Any]) -> str:
    rows = [
        (s["scenario"], s["accepted"], s["lost"], s["wrong"], s["duplicates"], s.get("note", ""))
        for s in report["scenarios"]
    ]
    return table(("scenario", "accepted", "lost", "wrong", "duplicates", "note"), rows)
