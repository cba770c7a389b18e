"""Pure Windows renderer: the same frozen policy as a PowerShell script (rendered here, applied on Windows).

Windows Firewall has no rule order: block beats allow, allow beats the profile default. So
inbound uses the profile's "block all connections" (inbound allow rules ignored), and outbound
is the profile default block, allow rules of our own group for the permitted peers, and a block
rule of our group whose remote addresses are the complement of the permitted ones, so an
existing allow rule cannot punch a hole. Release removes our group and restores the profiles
saved before the first isolation.

Allowlist v2 entries: an entry limited to a protocol (and ports) gets its own allow rule
(``-Protocol``, ``-RemotePort``) and block rules of our group for the rest of that address's
traffic (the other ports of its protocol, the other of TCP/UDP, ICMP), leaving out where it
overlaps another permitted peer. Expiry: an entry already expired when the script is rendered
is left out, and an expiring entry's allow rule gets a scheduled task (``\\HostIso\\``) that
removes it at ``expires_at``, so it closes on time without a new policy; every apply and the
release replace those tasks. Other IP protocols (GRE, ...) to a limited address fall to the
profile's default outbound block.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from agent.addresses import (
    HostFacts,
    IPAddress,
    IPNetwork,
    PermittedPeers,
    collapse,
    permitted_peers,
    split_families,
)
from shared.messages import FrozenPolicy

RULE_GROUP = "HostIso Isolation"
_STATE_PATH = r"$env:ProgramData\HostIso\firewall-profiles.xml"

_TASK_PATH = "\\HostIso\\"
_UNREGISTER_TASKS = (
    f"Get-ScheduledTask -TaskPath '{_TASK_PATH}' -ErrorAction SilentlyContinue"
    " | Unregister-ScheduledTask -Confirm:$false"
)

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
            _UNREGISTER_TASKS,
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


def _port_ranges(ports: Sequence[int]) -> list[str]:
    """The ports 1-65535 not in ``ports``, as -RemotePort ranges."""
    ranges: list[str] = []
    start = 1
    for port in sorted(ports):
        if port > start:
            ranges.append(str(start) if port - 1 == start else f"{start}-{port - 1}")
        start = port + 1
    if start <= 65535:
        ranges.append(str(start) if start == 65535 else f"{start}-65535")
    return ranges


def _subtract(network: IPNetwork, others: Iterable[IPNetwork]) -> list[IPNetwork]:
    """``network`` without any of ``others`` (each either inside it, around it or apart)."""
    pieces = [network]
    for other in collapse(o for o in others if o.version == network.version):
        remaining: list[IPNetwork] = []
        for piece in pieces:
            if piece.subnet_of(other):  # type: ignore[arg-type]
                continue
            if other.subnet_of(piece):  # type: ignore[arg-type]
                remaining.extend(piece.address_exclude(other))  # type: ignore[arg-type]
            else:
                remaining.append(piece)
        pieces = remaining
    return sorted(pieces, key=lambda n: (int(n.network_address), n.prefixlen))


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _entry_rules(peers: PermittedPeers, new_rule: str) -> list[str]:
    """Allow rules of the entries that are limited or expire, their block rules and tasks."""
    lines: list[str] = []
    unlimited = [e.network for e in peers.entries if e.protocol == "any"]
    for index, entry in enumerate(peers.entries, start=1):
        if entry.protocol == "any" and entry.expires_at is None:
            continue  # in the one "permitted peers" rule
        name = f"HostIso-entry-{index}"
        address = _remote(entry.network)
        allow = (
            f"{new_rule} -Action Allow -Name '{name}' -DisplayName 'HostIso allow entry {index}'"
        )
        if entry.protocol != "any":
            allow += f" -Protocol {entry.protocol.upper()}"
        if entry.ports:
            allow += f" -RemotePort {','.join(map(str, entry.ports))}"
        lines.append(f"{allow} -RemoteAddress @('{address}')")
        if entry.expires_at is not None:
            command = f"Remove-NetFirewallRule -Name {name}"
            lines.append(
                f"Register-ScheduledTask -TaskPath '{_TASK_PATH}' -TaskName 'expire-{name}'"
                " -User 'SYSTEM' -Force"
                f" -Trigger (New-ScheduledTaskTrigger -Once -At ([datetime]'{_utc(entry.expires_at)}'))"
                " -Action (New-ScheduledTaskAction -Execute 'powershell.exe'"
                f" -Argument '-NoProfile -NonInteractive -Command {command}') | Out-Null"
            )
        if entry.protocol == "any":
            continue
        # Block the rest of this address's traffic, except where another peer is permitted.
        others = [
            *peers.platform,
            *unlimited,
            *(e.network for i, e in enumerate(peers.entries, start=1) if i != index),
            *(ipaddress.ip_network(a) for a in peers.resolvers),
        ]
        blocked = _subtract(entry.network, others)
        if not blocked:
            continue
        targets = f"-RemoteAddress @({_ps_list([_remote(n) for n in blocked])})"
        block = f"{new_rule} -Action Block -DisplayName 'HostIso limit entry {index}'"
        other = "UDP" if entry.protocol == "tcp" else "TCP"
        icmp = "ICMPv4" if entry.network.version == 4 else "ICMPv6"
        if entry.ports:
            ranges = ", ".join(f"'{r}'" for r in _port_ranges(entry.ports))
            lines.append(
                f"{block} -Protocol {entry.protocol.upper()} -RemotePort @({ranges}) {targets}"
            )
        lines.append(f"{block} -Protocol {other} {targets}")
        lines.append(f"{block} -Protocol {icmp} {targets}")
    return lines


def render_windows_script(
    policy: FrozenPolicy, facts: HostFacts, *, now: datetime | None = None
) -> str:
    """PowerShell that isolates the host per ``policy`` (or releases it for ``mode: none``).

    ``now`` (default: the current time) is the apply time: entries expired by then are left
    out; expiring ones are removed by a scheduled task at their ``expires_at``.
    """
    if policy.mode == "none":
        return render_windows_release()
    peers = permitted_peers(policy, facts, now)
    steady = [e.network for e in peers.entries if e.protocol == "any" and e.expires_at is None]
    remote = sorted({_remote(n) for n in collapse((*peers.platform, *steady))})
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
        _UNREGISTER_TASKS,
        "# Inbound: block all connections, inbound allow rules included; outbound: default block.",
        "Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block"
        " -AllowInboundRules False -DefaultOutboundAction Block",
    ]
    if remote:
        lines.append(
            f"{new_rule} -Action Allow -DisplayName 'HostIso allow permitted peers'"
            f" -RemoteAddress @({_ps_list(remote)})"
        )
    lines += _entry_rules(peers, new_rule)
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
