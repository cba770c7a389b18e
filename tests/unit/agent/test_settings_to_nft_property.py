"""Property (issue 12): whatever the settings service accepts as allowlist entries (address or
prefix, ports, protocol, expiry), frozen into a policy by the isolation snapshot and rendered
by the agent at some later apply time, is a file the real ``nft -c -f`` accepts.

Checked in a throwaway network namespace, so the host's own ruleset is never touched; skipped
(with the reason) where ``ip netns`` or ``nft`` are missing.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.addresses import HostFacts
from agent.nft import render_ruleset, render_usage, retime
from services.isolation.domain import snapshot_allowlist
from services.settings import domain
from shared.messages import Actor, AllowlistChanged, FrozenPolicy
from tests.netns import requires_netns, run

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _prefix(pair: tuple[str, int]) -> str:
    return f"{pair[0]}/{pair[1]}"


def _network(pair: tuple[str, int]) -> str:
    return str(ipaddress.ip_network(f"{pair[0]}/{pair[1]}", strict=False))


ADDRESSES = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(20, 33)).map(_prefix),
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(22, 32)).map(_network),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(60, 128)).map(_network),
    st.sampled_from(
        [
            "203.0.113.10",
            "198.51.100.0/24",
            "2001:db8::10",
            "2001:db8:1::/64",
            "fd00::1",
            "10.0.0.0/24",
        ]
    ),
)
PORTS = st.one_of(
    st.none(),
    st.lists(st.sampled_from([22, 53, 443, 514, 8041]), max_size=4),
    st.lists(st.integers(-1, 65536), max_size=17),
)
PROTOCOLS = st.one_of(st.none(), st.sampled_from(["tcp", "udp", "any", "icmp", "TCP"]))
EXPIRY = st.one_of(
    st.none(),
    st.integers(-60, 90 * 86400 + 60).map(lambda s: (NOW + timedelta(seconds=s)).isoformat()),
    st.sampled_from(["tomorrow", "2026-12-24T08:30:00", "2026-12-24"]),
)
ENTRY = st.tuples(ADDRESSES, PORTS, PROTOCOLS, EXPIRY)


@pytest.fixture(scope="module")
def check_namespace() -> Iterator[str]:
    name = f"hi-v2-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def _allowlist(entries: list[tuple[str, object, object, object]]) -> domain.Allowlist:
    current = domain.Allowlist(account_id="acct-prop")
    for i, (address, ports, protocol, expires_at) in enumerate(entries):
        try:
            change = domain.add_entry(
                current,
                name=f"entry {i}",
                address=address,
                entry_id=f"e{i}",
                created_by="prop",
                now=NOW,
                max_entries=100,
                ports=ports,  # type: ignore[arg-type]
                protocol=protocol,  # type: ignore[arg-type]
                expires_at=expires_at,  # type: ignore[arg-type]
            )
        except domain.EntryRejectedError:
            continue
        current = change.after
    return current


@requires_netns
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(ENTRY, max_size=8),
    snapshot_after=st.integers(0, 90 * 86400),
    apply_after=st.integers(0, 600),
)
def test_whatever_settings_accepts_renders_into_a_file_nft_accepts(
    check_namespace: str,
    entries: list[tuple[str, object, object, object]],
    snapshot_after: int,
    apply_after: int,
) -> None:
    allowlist = _allowlist(entries)
    event = AllowlistChanged(
        account_id="acct-prop",
        enabled=True,
        entries=allowlist.entries,
        version=max(allowlist.version, 1),
        updated_at=NOW,
        changed_by=Actor(sub="prop", role="soc"),
    )
    snapshot_at = NOW + timedelta(seconds=snapshot_after)
    peers, version = snapshot_allowlist("acct-prop", event, now=snapshot_at)
    policy = FrozenPolicy(
        policy_id="prop",
        endpoint_id="ep-prop",
        account_id="acct-prop",
        sequence=1,
        mode="standard",
        allowed_outbound=peers,
        platform=("198.51.100.1",),
        settings_version=version,
        issued_at=snapshot_at,
        issued_by="prop",
    )
    apply_at = snapshot_at + timedelta(seconds=apply_after)
    facts = HostFacts(dns_resolvers=("192.0.2.53", "2001:db8::53"))
    ruleset = render_ruleset(policy, facts, "hiprop", now=apply_at)
    usage = render_usage(policy, "hiprop", now=apply_at)
    for text in (ruleset, retime(ruleset, apply_at + timedelta(seconds=apply_after)), usage):
        checked = subprocess.run(
            ["ip", "netns", "exec", check_namespace, "nft", "-c", "-f", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, f"{checked.stderr}\n{text}"


def test_the_generators_reach_every_kind_of_entry() -> None:
    # Not vacuous: the accepted entries cover prefixes, IPv6, ports and expiry.
    allowlist = _allowlist(
        [
            ("198.51.100.0/24", [443], "tcp", None),
            ("2001:DB8:0::10", None, "udp", (NOW + timedelta(hours=1)).isoformat()),
            ("2001:db8:1::/64", None, None, None),
        ]
    )
    assert [e.address for e in allowlist.entries] == [
        "198.51.100.0/24",
        "2001:db8::10",
        "2001:db8:1::/64",
    ]
