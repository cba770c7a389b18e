import ipaddress
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.addresses import HostFacts, InvalidAddressError
from agent.windows import complement, render_windows_script
from shared.messages import AllowedPeer
from tests.unit.agent.policies import make_policy

GOLDEN = Path(__file__).parent / "golden"
FACTS = HostFacts(platform_addresses=("198.51.100.2",), dns_resolvers=("192.0.2.53",))
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
V2 = make_policy(allowed=()).model_copy(
    update={
        "allowed_outbound": (
            AllowedPeer(name="RMM", address="203.0.113.10"),
            AllowedPeer(name="web", address="198.51.100.0/24", ports=(443, 8041), protocol="tcp"),
            AllowedPeer(name="syslog", address="2001:db8::10", ports=(514,), protocol="udp"),
            AllowedPeer(name="vendor", address="203.0.113.77", expires_at=NOW + timedelta(hours=2)),
            AllowedPeer(name="gone", address="203.0.113.99", expires_at=NOW),
        )
    }
)
CASES = {
    "windows_standard.ps1": make_policy(allowed=("203.0.113.10", "203.0.113.11")),
    "windows_v2.ps1": V2,
    "windows_strict.ps1": make_policy(mode="strict", sequence=2),
    "windows_release.ps1": make_policy(mode="none", sequence=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_windows_script_matches_golden_file(name: str) -> None:
    script = render_windows_script(CASES[name], FACTS, now=NOW)
    path = GOLDEN / name
    if os.environ.get("HOSTISO_UPDATE_GOLDEN") == "1":
        path.write_text(script)
    assert script == path.read_text(), (
        f"regenerate with HOSTISO_UPDATE_GOLDEN=1 if intended: {name}"
    )


def test_windows_isolation_blocks_all_inbound_and_uses_its_own_group() -> None:
    script = render_windows_script(CASES["windows_standard.ps1"], FACTS)
    assert "-DefaultInboundAction Block -AllowInboundRules False" in script
    assert all(
        "-Group $Group" in line for line in script.splitlines() if "New-NetFirewallRule" in line
    )


def test_windows_strict_allows_only_platform_peers() -> None:
    script = render_windows_script(CASES["windows_strict.ps1"], FACTS)
    assert (
        "'HostIso allow permitted peers' -RemoteAddress @('198.51.100.1', '198.51.100.2')" in script
    )
    assert "203.0.113.10'" not in script.split("block other IPv4")[0]


def test_windows_release_removes_our_group_and_restores_profiles() -> None:
    script = render_windows_script(CASES["windows_release.ps1"], FACTS)
    assert "Get-NetFirewallRule -Group $Group" in script and "Remove-NetFirewallRule" in script
    assert "New-NetFirewallRule" not in script
    assert "Import-Clixml" in script


def test_windows_renderer_refuses_junk_platform_configuration() -> None:
    with pytest.raises(InvalidAddressError):
        render_windows_script(make_policy(), HostFacts(platform_addresses=("rmm.example.com",)))


@pytest.mark.parametrize("resolver", ["fe80::1%eth0", "fe80::1", "not-an-ip", "ff02::1"])
def test_windows_renderer_drops_an_unusable_resolver_instead_of_failing(resolver: str) -> None:
    script = render_windows_script(
        make_policy(), HostFacts(platform_addresses=(), dns_resolvers=(resolver, "192.0.2.53"))
    )
    assert "-RemotePort 53 -RemoteAddress @('192.0.2.53')" in script
    assert resolver not in script and "%" not in script


def test_windows_renderer_allows_prefixes_and_ipv6_and_blocks_around_them() -> None:
    policy = make_policy(allowed=("203.0.113.10", "203.0.113.0/24", "2001:db8:1::/64"))
    script = render_windows_script(policy, FACTS)
    assert "'203.0.113.0/24'" in script and "'2001:db8:1::/64'" in script
    assert "'203.0.113.10'" not in script  # inside the /24, collapsed away
    block4 = script.split("block other IPv4' -RemoteAddress @(")[1].split(")")[0]
    blocked = [ipaddress.ip_network(n.strip("'")) for n in block4.split(", ")]
    for inside in ("203.0.113.0", "203.0.113.77", "203.0.113.255"):
        assert not any(ipaddress.ip_address(inside) in n for n in blocked)
    assert any(ipaddress.ip_address("203.0.114.0") in n for n in blocked)


@given(
    permitted=st.lists(st.ip_addresses(v=4), min_size=1, max_size=6),
    probe=st.ip_addresses(v=4),
)
def test_outbound_block_ranges_cover_everything_except_permitted_hosts(
    permitted: list[ipaddress.IPv4Address], probe: ipaddress.IPv4Address
) -> None:
    blocked = complement(permitted, 4)
    inside = any(probe in net for net in blocked)
    assert inside == (probe not in permitted)
    for address in permitted:
        assert not any(address in net for net in blocked)


@given(
    prefixes=st.lists(
        st.tuples(st.ip_addresses(v=4), st.integers(24, 32)).map(
            lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)
        ),
        min_size=1,
        max_size=6,
    ),
    probe=st.ip_addresses(v=4),
)
def test_outbound_block_ranges_cover_everything_except_permitted_prefixes(
    prefixes: list[ipaddress.IPv4Network], probe: ipaddress.IPv4Address
) -> None:
    # Overlapping prefixes in any order: excluding a subnet before its supernet must not
    # leave the supernet's other addresses unblocked.
    blocked = complement(prefixes, 4)
    assert any(probe in net for net in blocked) == (not any(probe in p for p in prefixes))
    for prefix in prefixes:
        for edge in (prefix.network_address, prefix.broadcast_address):
            assert not any(edge in net for net in blocked)


def _rules(script: str, marker: str) -> list[str]:
    return [line for line in script.splitlines() if marker in line]


def test_a_port_limited_entry_allows_its_ports_and_blocks_the_rest_of_its_address() -> None:
    script = render_windows_script(V2, FACTS, now=NOW)
    [allow] = _rules(script, "'HostIso allow entry 2'")
    assert "-Protocol TCP -RemotePort 443,8041 -RemoteAddress @('198.51.100.0/24')" in allow
    limits = _rules(script, "'HostIso limit entry 2'")
    assert any(
        "-Protocol TCP -RemotePort @('1-442', '444-8040', '8042-65535')" in r for r in limits
    )
    assert any("-Protocol UDP" in r for r in limits)
    assert any("-Protocol ICMPv4" in r for r in limits)
    # The platform address inside the prefix stays fully reachable: no limit names it.
    assert all("'198.51.100.1'" not in r and "'198.51.100.0/24'" not in r for r in limits)
    [udp] = _rules(script, "'HostIso allow entry 3'")
    assert "-Protocol UDP -RemotePort 514 -RemoteAddress @('2001:db8::10')" in udp


def test_an_expiring_entry_is_removed_by_a_scheduled_task_and_an_expired_one_is_left_out() -> None:
    script = render_windows_script(V2, FACTS, now=NOW)
    [allow] = _rules(script, "'HostIso allow entry 4'")
    assert "-Name 'HostIso-entry-4'" in allow and "'203.0.113.77'" in allow
    [task] = _rules(script, "Register-ScheduledTask")
    assert "[datetime]'2026-12-01T14:00:00Z'" in task
    assert "Remove-NetFirewallRule -Name HostIso-entry-4" in task
    assert "203.0.113.99" not in script.split("block other IPv4")[0]
    assert "Unregister-ScheduledTask" in script
    later = render_windows_script(V2, FACTS, now=NOW + timedelta(hours=2))
    assert (
        "Register-ScheduledTask" not in later
        and "'203.0.113.77'" not in later.split("block other IPv4")[0]
    )


def test_port_ranges_are_the_complement() -> None:
    from agent.windows import _port_ranges

    assert _port_ranges([1, 65535]) == ["2-65534"]
    assert _port_ranges([2, 3, 65534]) == ["1", "4-65533", "65535"]
