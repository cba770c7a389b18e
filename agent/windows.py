"""Pure Windows renderer: the same frozen policy as a PowerShell script (rendered here, applied on Windows).

Windows Firewall has no rule order: block beats allow, allow beats the profile default. So
inbound uses the profile's "block all connections" (inbound allow rules ignored), and outbound
is the profile default block, allow rules of our own group for the permitted peers, and a block
rule of our group whose remote addresses are the complement of the permitted ones, so an
existing allow rule cannot punch a hole. Release removes our group and restores the profiles
saved before the first isolation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from agent.addresses import (
    HostFacts,
    IPAddress,
    IPNetwork,
    collapse,
    permitted_peers,
    split_families,
)
from shared.messages import FrozenPolicy

RULE_GROUP = "HostIso Isolation"
_STATE_PATH = r"$env:ProgramData\HostIso\firewall-profiles.xml"

_HEADER = [
    "#Requires -RunAsAdministrator",
    "$ErrorActionPreference = 'Stop'",
    f"$Group = '{RULE_GROUP}'",
    f'$SavedProfiles = "{_STATE_PATH}"',
]


def complement(permitted: Iterable[IPAddress | IPNetwork], version: int) -> list[IPNetwork]:
    """The networks covering every address of the family except the permitted ones."""
    remaining: list[IPNetwork] = [ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")]
    # Collapsed first: excluding a prefix after one of its own subnets would leave the
    # subnet's siblings unblocked (no remaining piece would contain the whole prefix).
    hosts = collapse(ipaddress.ip_network(p) for p in permitted if p.version == version)
    for host in hosts:
        next_remaining: list[IPNetwork] = []
        for net in remaining:
            if net.version == host.version and host.subnet_of(net):  # type: ignore[arg-type]
                next_remaining.extend(net.address_exclude(host))  # type: ignore[arg-type]
            else:
                next_remaining.append(net)
        remaining = next_remaining
    return sorted(remaining, key=lambda n: (int(n.network_address), n.prefixlen))


def _remote(network: IPNetwork) -> str:
    # Hosts stay plain addresses (as before prefixes existed); prefixes as CIDR, which
    # -RemoteAddress accepts.
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _ps_list(items: Sequence[object]) -> str:
    return ", ".join(f"'{item}'" for item in items)


def render_windows_release() -> str:
    return "\n".join(
        [
            *_HEADER,
            "Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule",
            "if (Test-Path $SavedProfiles) {",
            "    foreach ($p in Import-Clixml $SavedProfiles) {",
            "        Set-NetFirewallProfile -Name $p.Name -DefaultInboundAction $p.DefaultInboundAction"
            " -DefaultOutboundAction $p.DefaultOutboundAction -AllowInboundRules $p.AllowInboundRules",
            "    }",
            "    Remove-Item $SavedProfiles",
            "}",
            "",
        ]
    )


def render_windows_script(policy: FrozenPolicy, facts: HostFacts) -> str:
    """PowerShell that isolates the host per ``policy`` (or releases it for ``mode: none``)."""
    if policy.mode == "none":
        return render_windows_release()
    peers = permitted_peers(policy, facts)
    remote = sorted({_remote(n) for n in (*peers.platform, *peers.allowlist)})
    resolvers4, resolvers6 = split_families(peers.resolvers)
    resolvers = [str(a) for a in (*resolvers4, *resolvers6)]
    # DHCP's broadcast must stay outside the block rule (block beats every allow rule).
    excluded = [*peers.all, ipaddress.IPv4Network("255.255.255.255/32")]
    block4 = [str(n) for n in complement(excluded, 4)]
    block6 = [str(n) for n in complement(excluded, 6)]
    new_rule = "New-NetFirewallRule -Group $Group -Profile Any -Direction Outbound"
    lines = [
        *_HEADER,
        "# Save the profiles once, so release restores what the administrator had.",
        "if (-not (Test-Path $SavedProfiles)) {",
        "    New-Item -ItemType Directory -Force -Path (Split-Path $SavedProfiles) | Out-Null",
        "    Get-NetFirewallProfile | Select-Object Name, DefaultInboundAction,"
        " DefaultOutboundAction, AllowInboundRules | Export-Clixml $SavedProfiles",
        "}",
        "Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule",
        "# Inbound: block all connections, inbound allow rules included; outbound: default block.",
        "Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block"
        " -AllowInboundRules False -DefaultOutboundAction Block",
    ]
    if remote:
        lines.append(
            f"{new_rule} -Action Allow -DisplayName 'HostIso allow permitted peers'"
            f" -RemoteAddress @({_ps_list(remote)})"
        )
    if resolvers:
        lines += [
            f"{new_rule} -Action Allow -DisplayName 'HostIso allow DNS (UDP)' -Protocol UDP"
            f" -RemotePort 53 -RemoteAddress @({_ps_list(resolvers)})",
            f"{new_rule} -Action Allow -DisplayName 'HostIso allow DNS (TCP)' -Protocol TCP"
            f" -RemotePort 53 -RemoteAddress @({_ps_list(resolvers)})",
        ]
    lines += [
        f"{new_rule} -Action Allow -DisplayName 'HostIso allow DHCPv4' -Protocol UDP"
        " -LocalPort 68 -RemotePort 67",
        f"{new_rule} -Action Allow -DisplayName 'HostIso allow DHCPv6' -Protocol UDP"
        " -LocalPort 546 -RemotePort 547",
        f"{new_rule} -Action Block -DisplayName 'HostIso block other IPv4'"
        f" -RemoteAddress @({_ps_list(block4)})",
        f"{new_rule} -Action Block -DisplayName 'HostIso block other IPv6'"
        f" -RemoteAddress @({_ps_list(block6)})",
        "",
    ]
    return "\n".join(lines)
