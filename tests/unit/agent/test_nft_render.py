import re

import pytest

from agent.addresses import HostFacts, InvalidAddressError
from agent.nft import InvalidTableNameError, render_ruleset, rules_sha256
from tests.unit.agent.policies import make_policy

FACTS = HostFacts(platform_addresses=("198.51.100.2",), dns_resolvers=("192.0.2.53",))


def _set_elements(ruleset: str, name: str) -> set[str]:
    match = re.search(
        rf"set {name} {{\n\t\ttype \w+\n(?:\t\telements = {{ (.*) }}\n)?\t}}", ruleset
    )
    assert match, f"set {name} missing"
    return set(match.group(1).split(", ")) if match.group(1) else set()


def _chain(ruleset: str, name: str) -> str:
    match = re.search(rf"\tchain {name} {{\n(.*?)\n\t}}", ruleset, re.S)
    assert match, f"chain {name} missing"
    return match.group(1)


def test_standard_policy_puts_frozen_allowlist_and_platform_in_sets() -> None:
    ruleset = render_ruleset(
        make_policy(allowed=("203.0.113.10", "203.0.113.11")), FACTS, "hostiso"
    )
    assert _set_elements(ruleset, "allowlist4") == {"203.0.113.10", "203.0.113.11"}
    assert _set_elements(ruleset, "platform4") == {"198.51.100.1", "198.51.100.2"}
    assert _set_elements(ruleset, "resolvers4") == {"192.0.2.53"}


def test_strict_policy_has_an_empty_allowlist_set() -> None:
    ruleset = render_ruleset(make_policy(mode="strict"), FACTS, "hostiso")
    assert _set_elements(ruleset, "allowlist4") == set()
    assert _set_elements(ruleset, "platform4") == {"198.51.100.1", "198.51.100.2"}


def test_ruleset_replaces_the_table_atomically_in_one_file() -> None:
    lines = render_ruleset(make_policy(), FACTS, "hostiso").splitlines()
    assert lines[:3] == [
        "add table inet hostiso",
        "delete table inet hostiso",
        "table inet hostiso {",
    ]


def test_release_deletes_the_table_even_when_absent() -> None:
    assert render_ruleset(make_policy(mode="none", sequence=2), FACTS, "hostiso") == (
        "add table inet hostiso\ndelete table inet hostiso\n"
    )


def test_every_base_chain_drops_by_default() -> None:
    ruleset = render_ruleset(make_policy(), FACTS)
    for chain, hook in (("input", "input"), ("output", "output"), ("forward", "forward")):
        assert f"type filter hook {hook} priority filter; policy drop;" in _chain(ruleset, chain)
    assert _chain(ruleset, "forward").count("\n") == 0


def test_inbound_accepts_only_replies_of_flows_the_host_opened_to_permitted_peers() -> None:
    inbound = _chain(render_ruleset(make_policy(), FACTS), "input")
    accepts = [line.strip() for line in inbound.splitlines() if line.strip().endswith("accept")]
    conntrack = [rule for rule in accepts if "ct state" in rule]
    assert conntrack, "no conntrack rule"
    for rule in conntrack:
        assert "ct direction reply" in rule and "ct original" in rule and "daddr @" in rule
    # No address-based accept of new inbound traffic, no blanket established accept.
    assert not any(re.search(r"\bip6? saddr\b", rule) for rule in accepts)
    assert "ct state established,related accept" not in inbound


def test_outbound_accepts_only_the_hosts_own_flows() -> None:
    outbound = _chain(render_ruleset(make_policy(), FACTS), "output")
    for rule in outbound.splitlines():
        if "daddr @" in rule:
            assert "ct direction original" in rule


def test_dns_is_allowed_only_to_configured_resolvers_on_port_53() -> None:
    outbound = _chain(render_ruleset(make_policy(), FACTS), "output")
    dns = [line for line in outbound.splitlines() if "53" in line]
    assert dns and all("@resolvers" in line and "th dport 53" in line for line in dns)


def test_loopback_and_dhcp_stay_open() -> None:
    ruleset = render_ruleset(make_policy(mode="strict"), FACTS)
    assert 'iif "lo" accept' in _chain(ruleset, "input")
    assert 'oif "lo" accept' in _chain(ruleset, "output")
    assert "udp sport 68 udp dport 67 accept" in _chain(ruleset, "output")
    assert "udp sport 67 udp dport 68 accept" in _chain(ruleset, "input")
    assert "udp sport 546 udp dport 547 accept" in _chain(ruleset, "output")


def test_ipv6_neighbour_discovery_only_when_an_ipv6_peer_is_permitted() -> None:
    assert "icmpv6" not in render_ruleset(make_policy(), FACTS)
    with_v6 = HostFacts(platform_addresses=("2001:db8::1",), dns_resolvers=())
    ruleset = render_ruleset(make_policy(), with_v6)
    assert _set_elements(ruleset, "platform6") == {"2001:db8::1"}
    assert "nd-neighbor-solicit" in ruleset


def test_rendering_is_deterministic_and_hash_tracks_content() -> None:
    a = render_ruleset(make_policy(allowed=("203.0.113.11", "203.0.113.10")), FACTS)
    b = render_ruleset(make_policy(allowed=("203.0.113.10", "203.0.113.11")), FACTS)
    strict = render_ruleset(make_policy(mode="strict"), FACTS)
    assert a == b
    assert rules_sha256(a) == rules_sha256(b) != rules_sha256(strict)
    assert re.fullmatch(r"[0-9a-f]{64}", rules_sha256(a))


@pytest.mark.parametrize(
    "address",
    [
        "rmm.example.com",
        "203.0.113.0/24",
        "010.0.0.1",
        "203.0.113.10 ",
        "",
        "2001:db8::10",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "1.2.3.4; flush ruleset",
        "203.0.113.10 }\n chain x {",
    ],
)
def test_allowlist_address_that_is_not_a_single_ipv4_host_is_refused(address: str) -> None:
    with pytest.raises(InvalidAddressError) as refused:
        render_ruleset(make_policy(allowed=(address,)), FACTS)
    assert refused.value.field == "allowed_outbound.address"


@pytest.mark.parametrize("address", ["platform.example", "10.0.0.0/8", "ff02::1", "::"])
def test_platform_and_resolver_addresses_are_validated_too(address: str) -> None:
    with pytest.raises(InvalidAddressError):
        render_ruleset(make_policy(platform=(address,)), FACTS)
    with pytest.raises(InvalidAddressError):
        render_ruleset(make_policy(), HostFacts(dns_resolvers=(address,)))


def test_strict_policy_ignores_allowlist_entries_rather_than_rendering_them() -> None:
    strict = make_policy(mode="strict").model_copy(
        update={"allowed_outbound": make_policy().allowed_outbound}
    )
    assert _set_elements(render_ruleset(strict, FACTS), "allowlist4") == set()


@pytest.mark.parametrize("table", ["", "1abc", "host iso", "x;flush ruleset", "a" * 33])
def test_bad_table_name_is_refused(table: str) -> None:
    with pytest.raises(InvalidTableNameError):
        render_ruleset(make_policy(), FACTS, table)
