import json
import logging
import re

import pytest
from pydantic import ValidationError

from agent.addresses import HostFacts, InvalidAddressError
from agent.nft import InvalidTableNameError, render_ruleset, rules_sha256
from shared.messages import FrozenPolicy
from tests.unit.agent.policies import make_policy

FACTS = HostFacts(platform_addresses=("198.51.100.2",), dns_resolvers=("192.0.2.53",))


def _set_elements(ruleset: str, name: str) -> set[str]:
    match = re.search(
        rf"set {name} {{\n\t\ttype \w+\n(?:\t\tflags interval\n)?(?:\t\telements = {{ (.*) }}\n)?\t}}",
        ruleset,
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
        "203.0.113.0/16",
        "203.0.113.1/24",
        "010.0.0.1",
        "203.0.113.10 ",
        "",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "fe80::1%eth0",
        "ff02::1",
        "::",
        "::ffff:203.0.113.10",
        "203.0.113.0/255.255.255.0",
        "1.2.3.4; flush ruleset",
        "203.0.113.10 }\n chain x {",
    ],
)
def test_policy_naming_an_unrenderable_address_is_refused_at_decode(address: str) -> None:
    wire = make_policy().model_dump(mode="json")
    for field, value in (
        ("allowed_outbound", [{"name": "RMM", "address": address}]),
        ("platform", [address]),
    ):
        with pytest.raises(ValidationError) as refused:
            FrozenPolicy.model_validate_json(json.dumps({**wire, field: value}))
        [error] = refused.value.errors()
        assert error["loc"][0] == field


def test_ipv6_and_narrow_prefixes_in_a_policy_are_rendered() -> None:
    policy = make_policy(
        allowed=("203.0.113.0/24", "203.0.113.10", "2001:db8::10", "2001:db8:1::/64"),
        platform=("198.51.100.1", "2001:db8:ff::1"),
    )
    ruleset = render_ruleset(policy, FACTS)
    # The host inside the prefix is collapsed away: an interval set refuses overlaps.
    assert _set_elements(ruleset, "allowlist4") == {"203.0.113.0/24"}
    assert _set_elements(ruleset, "allowlist6") == {"2001:db8::10", "2001:db8:1::/64"}
    assert _set_elements(ruleset, "platform6") == {"2001:db8:ff::1"}
    assert "\tset allowlist4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n" in ruleset
    assert "flags interval" not in ruleset.split("set platform4")[1].split("}")[0]
    outbound = _chain(ruleset, "output")
    assert "ct direction original ip6 daddr @allowlist6 accept" in outbound
    assert "nd-neighbor-solicit" in outbound


@pytest.mark.parametrize("address", ["platform.example", "10.0.0.0/24", "ff02::1", "::"])
def test_agent_configured_platform_addresses_are_validated(address: str) -> None:
    with pytest.raises(InvalidAddressError) as refused:
        render_ruleset(make_policy(), HostFacts(platform_addresses=(address,)))
    assert refused.value.field == "platform_addresses"


@pytest.mark.parametrize(
    "resolver", ["fe80::1%eth0", "fe80::1", "resolver.example", "ff02::1", "::", "1.2.3.4x"]
)
def test_an_unusable_resolver_is_dropped_and_the_ruleset_still_renders(
    resolver: str, caplog: pytest.LogCaptureFixture
) -> None:
    facts = HostFacts(dns_resolvers=(resolver, "192.0.2.53"))
    with caplog.at_level(logging.WARNING, logger="agent.addresses"):
        ruleset = render_ruleset(make_policy(), facts)
    assert _set_elements(ruleset, "resolvers4") == {"192.0.2.53"}
    assert _set_elements(ruleset, "resolvers6") == set()
    assert "%" not in ruleset
    assert any(resolver in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)


def test_strict_policy_ignores_allowlist_entries_rather_than_rendering_them() -> None:
    strict = make_policy(mode="strict").model_copy(
        update={"allowed_outbound": make_policy().allowed_outbound}
    )
    assert _set_elements(render_ruleset(strict, FACTS), "allowlist4") == set()


@pytest.mark.parametrize("table", ["", "1abc", "host iso", "x;flush ruleset", "a" * 33])
def test_bad_table_name_is_refused(table: str) -> None:
    with pytest.raises(InvalidTableNameError):
        render_ruleset(make_policy(), FACTS, table)
