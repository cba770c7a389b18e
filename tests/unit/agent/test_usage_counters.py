"""Usage counters: the counting table, parsing ``nft -j list counters``, deltas per sequence."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from agent.addresses import HostFacts
from agent.firewall import UsageReading
from agent.nft import CounterEntry, parse_counters, render_ruleset, render_usage, usage_counters
from agent.usage import UsageTracker
from shared.messages import AllowedPeer, FrozenPolicy

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RMM = CounterEntry("e0", "203.0.113.10", "tcp", (8041,))
WEB = CounterEntry("e1", "2001:db8::/64", "any", ())


def _policy(sequence: int = 3, mode: str = "standard") -> FrozenPolicy:
    return FrozenPolicy(
        policy_id="pol",
        endpoint_id="ep-1",
        account_id="acct-1",
        sequence=sequence,
        mode=mode,  # type: ignore[arg-type]
        allowed_outbound=(
            AllowedPeer(name="rmm", address="203.0.113.10", ports=(8041,), protocol="tcp"),
            AllowedPeer(name="web", address="2001:db8::/64"),
            AllowedPeer(name="old", address="198.51.100.7", expires_at=NOW - timedelta(hours=1)),
        ),
        platform=("198.51.100.1",),
        settings_version=1,
        issued_at=NOW,
        issued_by="soc-analyst",
    )


def _reading(sequence: int, generation: int, **totals: tuple[int, int]) -> UsageReading:
    return UsageReading(sequence, generation, (RMM, WEB), dict(totals))


def test_one_named_counter_per_live_entry_and_none_for_an_expired_one() -> None:
    assert usage_counters(_policy(), NOW) == [RMM, WEB]
    text = render_usage(_policy(), "hostiso", now=NOW)
    assert 'counter name "e0"' in text and 'counter name "e1"' in text and "e2" not in text
    assert "ip daddr 203.0.113.10 th dport { 8041 }" in text
    assert "ip6 daddr 2001:db8::/64" in text
    # Count only, after the enforcing table: no drop, no verdict but the chains' accept policy.
    assert "drop" not in text and text.count("priority filter + 10; policy accept;") == 2


def test_strict_and_release_policies_count_nothing() -> None:
    assert usage_counters(_policy(mode="strict"), NOW) == []
    assert usage_counters(_policy(mode="none"), NOW) == []


def test_the_enforcing_ruleset_holds_no_counter_so_its_hash_is_unchanged() -> None:
    facts = HostFacts(platform_addresses=(), dns_resolvers=())
    assert "counter" not in render_ruleset(_policy(), facts, now=NOW)


def test_counters_listing_is_parsed_by_name() -> None:
    listing = json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
                {
                    "counter": {
                        "family": "inet",
                        "name": "e0",
                        "table": "hostiso_usage",
                        "handle": 1,
                        "packets": 12,
                        "bytes": 900,
                    }
                },
            ]
        }
    )
    assert parse_counters(listing) == {"e0": (12, 900)}


def test_an_unreadable_counter_is_refused() -> None:
    with pytest.raises(ValueError, match="unreadable counter"):
        parse_counters('{"nftables": [{"counter": {"name": "e0", "packets": "12"}}]}')


def test_first_report_of_a_sequence_names_every_entry_then_only_deltas() -> None:
    tracker = UsageTracker()
    tracker.observe(_reading(3, 1), NOW)
    body = tracker.body()
    assert body is not None and body["sequence"] == 3
    assert [(c["address"], c["packets"]) for c in body["counters"]] == [
        ("203.0.113.10", 0),
        ("2001:db8::/64", 0),
    ]
    tracker.sent(body)
    tracker.observe(_reading(3, 1), NOW)
    assert tracker.body() is None
    tracker.observe(_reading(3, 1, e0=(5, 400)), NOW)
    body = tracker.body()
    assert body == {
        "sequence": 3,
        "counters": [
            {
                "address": "203.0.113.10",
                "ports": [8041],
                "protocol": "tcp",
                "packets": 5,
                "bytes": 400,
                "last_seen": NOW.isoformat(),
            }
        ],
    }
    tracker.sent(body)
    tracker.observe(_reading(3, 1, e0=(7, 520)), NOW)
    body = tracker.body()
    assert body is not None and (body["counters"][0]["packets"], body["counters"][0]["bytes"]) == (
        2,
        120,
    )


def test_unsent_deltas_add_up_until_a_report_is_taken() -> None:
    tracker = UsageTracker()
    tracker.observe(_reading(3, 1), NOW)
    tracker.sent(tracker.body() or {})
    tracker.observe(_reading(3, 1, e0=(2, 100)), NOW)
    tracker.observe(_reading(3, 1, e0=(6, 300)), NOW)  # the report of the first failed
    body = tracker.body()
    assert body is not None and body["counters"][0]["packets"] == 6


def test_a_new_sequence_starts_from_zero_and_drops_the_superseded_counts() -> None:
    tracker = UsageTracker()
    tracker.observe(_reading(3, 1, e0=(9, 900)), NOW)  # never reported
    tracker.observe(_reading(4, 2, e0=(1, 60)), NOW)
    body = tracker.body()
    assert body is not None and body["sequence"] == 4
    assert {c["address"]: c["packets"] for c in body["counters"]}["203.0.113.10"] == 1


def test_a_reloaded_counting_table_restarts_the_baseline_without_losing_deltas() -> None:
    tracker = UsageTracker()
    tracker.observe(_reading(3, 1), NOW)
    tracker.sent(tracker.body() or {})
    tracker.observe(_reading(3, 1, e0=(50, 5000)), NOW)
    tracker.sent(tracker.body() or {})
    # Re-applied (restart, watchdog): the kernel counts from zero again, 3 new packets.
    tracker.observe(_reading(3, 2, e0=(3, 180)), NOW)
    body = tracker.body()
    assert body is not None and body["counters"][0]["packets"] == 3
