"""Policy v2 in the nftables renderer: IPv4/IPv6 sets, address . port concatenations per
protocol, element timeouts from ``expires_at`` at apply time, ND only with an IPv6 peer."""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from agent.addresses import HostFacts
from agent.nft import is_permitted, render_ruleset, retime
from shared.messages import AllowedPeer, FrozenPolicy, PeerProtocol
from tests.unit.agent.policies import make_policy

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FACTS = HostFacts(platform_addresses=("198.51.100.2",), dns_resolvers=("192.0.2.53",))


def _policy(*peers: AllowedPeer) -> FrozenPolicy:
    return make_policy(allowed=()).model_copy(update={"allowed_outbound": peers})


def _set(ruleset: str, name: str) -> str:
    match = re.search(rf"\tset {name} {{\n(.*?)\n\t}}", ruleset, re.S)
    assert match, f"set {name} missing:\n{ruleset}"
    return match.group(1)


def _elements(ruleset: str, name: str) -> list[str]:
    match = re.search(r"elements = \{ (.*) \}", _set(ruleset, name))
    return match.group(1).split(", ") if match else []


def test_a_v1_policy_renders_without_any_v2_set_or_rule() -> None:
    ruleset = render_ruleset(make_policy(allowed=("203.0.113.10",)), FACTS, now=NOW)
    assert "_tcp" not in ruleset and "_udp" not in ruleset and "timeout" not in ruleset
    # And it does not depend on the time it is applied at.
    assert ruleset == render_ruleset(make_policy(allowed=("203.0.113.10",)), FACTS)


def test_ports_are_address_port_concatenations_per_protocol_and_family() -> None:
    ruleset = render_ruleset(
        _policy(
            AllowedPeer(name="a", address="203.0.113.10", ports=(8041, 443), protocol="tcp"),
            AllowedPeer(name="b", address="198.51.100.0/24", ports=(514,), protocol="udp"),
            AllowedPeer(name="c", address="2001:db8::10", ports=(8041,), protocol="tcp"),
        ),
        FACTS,
        now=NOW,
    )
    assert "type ipv4_addr . inet_service" in _set(ruleset, "allowlist4_tcp_ports")
    assert _elements(ruleset, "allowlist4_tcp_ports") == [
        "203.0.113.10 . 443",
        "203.0.113.10 . 8041",
    ]
    assert "flags interval" in _set(ruleset, "allowlist4_udp_ports")
    assert _elements(ruleset, "allowlist4_udp_ports") == ["198.51.100.0/24 . 514"]
    assert "type ipv6_addr . inet_service" in _set(ruleset, "allowlist6_tcp_ports")
    assert _elements(ruleset, "allowlist6_tcp_ports") == ["2001:db8::10 . 8041"]
    assert _elements(ruleset, "allowlist4") == [] and _elements(ruleset, "allowlist6") == []
    assert "ct direction original ip daddr . tcp dport @allowlist4_tcp_ports accept" in ruleset
    assert "ct direction original ip6 daddr . tcp dport @allowlist6_tcp_ports accept" in ruleset
    # Replies only of flows the host opened, matched on the original destination and port.
    assert (
        "ct state established,related ct direction reply meta l4proto tcp ct original ip daddr"
        " . ct original proto-dst @allowlist4_tcp_ports accept"
    ) in ruleset


def test_a_protocol_without_ports_is_a_plain_set_matched_with_its_protocol() -> None:
    ruleset = render_ruleset(
        _policy(AllowedPeer(name="a", address="203.0.113.10", protocol="udp")), FACTS, now=NOW
    )
    assert _elements(ruleset, "allowlist4_udp") == ["203.0.113.10"]
    assert "ct direction original meta l4proto udp ip daddr @allowlist4_udp accept" in ruleset
    assert "allowlist4_tcp" not in ruleset


def test_expiry_becomes_an_element_timeout_at_apply_time_and_expired_entries_are_left_out() -> None:
    policy = _policy(
        AllowedPeer(name="a", address="203.0.113.10", expires_at=NOW + timedelta(hours=2)),
        AllowedPeer(
            name="b",
            address="203.0.113.20",
            ports=(22,),
            protocol="tcp",
            expires_at=NOW + timedelta(seconds=90),
        ),
        AllowedPeer(name="gone", address="203.0.113.30", expires_at=NOW),
    )
    ruleset = render_ruleset(policy, FACTS, now=NOW)
    assert "flags timeout" in _set(ruleset, "allowlist4")
    assert _elements(ruleset, "allowlist4") == [
        '203.0.113.10 timeout 7200s comment "expires 2026-12-01T14:00:00Z"'
    ]
    assert _elements(ruleset, "allowlist4_tcp_ports") == [
        '203.0.113.20 . 22 timeout 90s comment "expires 2026-12-01T12:01:30Z"'
    ]
    assert "203.0.113.30" not in ruleset
    later = render_ruleset(policy, FACTS, now=NOW + timedelta(seconds=90))
    assert "203.0.113.20" not in later and "allowlist4_tcp_ports" not in later
    assert "timeout 7110s" in later


def test_retime_recomputes_stored_timeouts_and_drops_what_expired() -> None:
    policy = _policy(
        AllowedPeer(name="a", address="203.0.113.10", expires_at=NOW + timedelta(hours=2)),
        AllowedPeer(name="b", address="203.0.113.11", expires_at=NOW + timedelta(minutes=1)),
        AllowedPeer(name="c", address="203.0.113.12"),
    )
    stored = render_ruleset(policy, FACTS, now=NOW)
    again = retime(stored, NOW + timedelta(minutes=30))
    assert _elements(again, "allowlist4") == [
        '203.0.113.10 timeout 5400s comment "expires 2026-12-01T14:00:00Z"',
        "203.0.113.12",
    ]
    assert retime(stored, NOW) == stored
    plain = render_ruleset(make_policy(), FACTS)
    assert retime(plain, NOW + timedelta(days=400)) == plain


def test_overlapping_entries_keep_the_longest_lifetime_where_they_overlap() -> None:
    policy = _policy(
        AllowedPeer(name="wide", address="198.51.100.0/24", expires_at=NOW + timedelta(hours=1)),
        AllowedPeer(name="host", address="198.51.100.7"),
    )
    elements = _elements(render_ruleset(policy, FACTS, now=NOW), "allowlist4")
    assert "198.51.100.7" in elements  # forever
    pieces = [ipaddress.ip_network(e.split()[0]) for e in elements]
    assert sum(p.num_addresses for p in pieces) == 256
    assert all(not a.overlaps(b) for i, a in enumerate(pieces) for b in pieces[i + 1 :])


def test_icmpv6_neighbour_discovery_only_while_an_ipv6_peer_is_rendered() -> None:
    v6 = AllowedPeer(name="v6", address="2001:db8::10", expires_at=NOW + timedelta(minutes=5))
    assert "nd-neighbor-solicit" in render_ruleset(_policy(v6), FACTS, now=NOW)
    assert "icmpv6" not in render_ruleset(_policy(v6), FACTS, now=NOW + timedelta(minutes=5))
    strict = make_policy(mode="strict")
    assert "icmpv6" not in render_ruleset(strict, FACTS, now=NOW)


def test_is_permitted_follows_protocol_ports_and_expiry() -> None:
    policy = _policy(
        AllowedPeer(name="a", address="203.0.113.10", ports=(8041,), protocol="tcp"),
        AllowedPeer(name="b", address="2001:db8::/64", protocol="udp"),
        AllowedPeer(name="c", address="203.0.113.77", expires_at=NOW + timedelta(minutes=1)),
    )

    def ok(address: str, protocol: str | None, port: int | None, at: datetime = NOW) -> bool:
        return is_permitted(policy, FACTS, address, protocol=protocol, port=port, now=at)

    assert ok("203.0.113.10", "tcp", 8041)
    assert not ok("203.0.113.10", "tcp", 22)
    assert not ok("203.0.113.10", "udp", 8041)
    assert ok("2001:db8::5", "udp", 53) and not ok("2001:db8::5", "tcp", 443)
    assert ok("203.0.113.77", "tcp", 22)
    assert not ok("203.0.113.77", "tcp", 22, NOW + timedelta(minutes=1))
    assert ok("198.51.100.2", "tcp", 22)  # platform
    assert ok("192.0.2.53", "udp", 53) and not ok("192.0.2.53", "tcp", 22)  # resolver


PROTOCOLS: list[PeerProtocol] = ["tcp", "udp", "any"]


@given(
    entries=st.lists(
        st.tuples(
            st.integers(0, 15),
            st.sampled_from([32, 30, 28]),
            st.sampled_from(PROTOCOLS),
            st.lists(st.sampled_from([22, 443, 8041]), max_size=2, unique=True),
            st.one_of(st.none(), st.integers(-5, 5)),
        ),
        max_size=6,
    ),
    probe=st.tuples(
        st.integers(0, 15), st.sampled_from(["tcp", "udp"]), st.sampled_from([22, 443, 8041, 80])
    ),
)
def test_rendered_elements_allow_exactly_what_the_entries_allow(
    entries: list[tuple[int, int, PeerProtocol, list[int], int | None]],
    probe: tuple[int, str, int],
) -> None:
    peers = []
    for host, length, protocol, ports, minutes in entries:
        network = ipaddress.ip_network(f"203.0.113.{host}/{length}", strict=False)
        peers.append(
            AllowedPeer(
                name="p",
                address=str(network),
                protocol=protocol,
                ports=tuple(ports) if protocol != "any" else (),
                expires_at=None if minutes is None else NOW + timedelta(minutes=minutes),
            )
        )
    policy = _policy(*peers)
    ruleset = render_ruleset(policy, HostFacts(), now=NOW)
    address = ipaddress.ip_address(f"203.0.113.{probe[0]}")
    protocol, port = probe[1], probe[2]

    def hit(name: str, with_port: bool) -> bool:
        if f"set {name} " not in ruleset:
            return False
        for element in _elements(ruleset, name):
            key = element.split(" timeout ")[0]
            net, _, element_port = key.partition(" . ")
            if address in ipaddress.ip_network(net) and (
                not with_port or int(element_port) == port
            ):
                return True
        return False

    rendered = (
        hit("allowlist4", False)
        or hit(f"allowlist4_{protocol}", False)
        or hit(f"allowlist4_{protocol}_ports", True)
    )
    expected = is_permitted(
        policy, HostFacts(), str(address), protocol=protocol, port=port, now=NOW
    )
    assert rendered == expected
