"""Address validation shared by the renderers: what reaches a ruleset is a literal nft can render.

Three sources feed a ruleset, and each fails differently (ENFORCEMENT.md "Zone ids and odd
resolvers"): the policy's addresses are checked by the message model at decode (a policy that
names an unrenderable address is refused whole); the agent's own platform addresses are its
configuration (refused at start); the host's resolvers come from ``/etc/resolv.conf``, which
NetworkManager or a rogue router advertisement may fill with what nft cannot render, so an
unusable resolver is *dropped with a logged reason* and never fails the ruleset: a host must
never stay open because one resolver line was odd.

Link-local IPv6 resolvers are dropped in both forms: nft cannot name ``fe80::1%eth0``, and
without its zone the address cannot be used (a socket to ``fe80::/10`` needs a scope id), so
keeping ``fe80::1`` would open port 53 to a neighbour for nothing. An isolated host whose only
resolver is link-local loses DNS, which isolation may cost; it never loses the platform.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.addresses import (
    AddressRuleError,
    IPAddress,
    IPNetwork,
    parse_address_or_prefix,
    parse_host_address,
)
from shared.messages import FrozenPolicy, PeerProtocol

__all__ = [
    "AllowedEntry",
    "HostFacts",
    "IPAddress",
    "IPNetwork",
    "InvalidAddressError",
    "PermittedPeers",
    "collapse",
    "parse_resolv_conf",
    "permitted_peers",
    "read_resolv_conf",
    "resolver_problem",
    "split_families",
    "split_networks",
    "usable_resolvers",
]

log = logging.getLogger(__name__)

_LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")


class InvalidAddressError(ValueError):
    """An address in the policy or the host facts is not one a firewall rule may name."""

    def __init__(self, field: str, value: str, rule: str) -> None:
        super().__init__(f"{field}: {value!r} {rule}")
        self.field = field
        self.value = value
        self.rule = rule


def _host_address(field: str, value: str) -> IPAddress:
    try:
        return parse_host_address(value)
    except AddressRuleError as exc:
        raise InvalidAddressError(field, str(value), exc.message) from exc


def _networks(field: str, values: Iterable[str]) -> tuple[IPNetwork, ...]:
    found: list[IPNetwork] = []
    for value in values:
        try:
            found.append(parse_address_or_prefix(value))
        except AddressRuleError as exc:
            raise InvalidAddressError(field, str(value), exc.message) from exc
    return collapse(found)


def collapse(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Sorted, deduplicated, with nothing inside another: nft interval sets refuse overlaps.

    Unlike ``ipaddress.collapse_addresses`` neighbours are not merged, so two adjacent hosts
    stay two plain elements (the common ruleset keeps its text and hash).
    """
    items = list(networks)
    kept: list[IPNetwork] = []
    for family in (4, 6):
        last: IPNetwork | None = None
        ordered = sorted(
            (n for n in items if n.version == family),
            key=lambda n: (int(n.network_address), n.prefixlen),
        )
        for network in ordered:
            if last is not None and network.subnet_of(last):  # type: ignore[arg-type]
                continue
            kept.append(network)
            last = network
    return tuple(kept)


def resolver_problem(value: str) -> str | None:
    """Why ``value`` cannot be an allowed DNS resolver, or None when it can."""
    try:
        address = parse_host_address(value)
    except AddressRuleError as exc:
        return exc.message
    if isinstance(address, ipaddress.IPv6Address) and address in _LINK_LOCAL_V6:
        return "is link-local: unusable without a zone id, and a firewall rule cannot name one"
    return None


def usable_resolvers(values: Iterable[str], source: str = "dns_resolvers") -> tuple[IPAddress, ...]:
    """The resolvers a ruleset can allow, in order, deduplicated; the rest dropped and logged."""
    seen: dict[IPAddress, None] = {}
    for value in values:
        problem = resolver_problem(value)
        if problem is not None:
            log.warning("ignoring DNS resolver %r from %s: %s", value, source, problem)
            continue
        seen.setdefault(parse_host_address(value), None)
    return tuple(seen)


def parse_resolv_conf(text: str, source: str = "resolv.conf") -> tuple[str, ...]:
    """The ``nameserver`` addresses of a resolv.conf text that a ruleset can allow."""
    values: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0] != "nameserver":
            continue  # comments (# or ;), options, search domains, garbage: not resolvers
        if len(parts) < 2:
            log.warning("ignoring line %d of %s: nameserver without an address", number, source)
            continue
        values.append(parts[1])
    return tuple(str(a) for a in usable_resolvers(values, source))


def read_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The usable ``nameserver`` addresses of ``path``; none (logged) if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        log.warning("cannot read %s: %s; no DNS resolver allowed", path, exc.strerror)
        return ()
    return parse_resolv_conf(text, str(path))


@dataclass(frozen=True)
class HostFacts:
    """What the host adds to every policy: the platform's addresses and its DNS resolvers."""

    platform_addresses: tuple[str, ...] = ()
    dns_resolvers: tuple[str, ...] = ()


@dataclass(frozen=True)
class AllowedEntry:
    """One allowlist peer of the policy in force: where, which transport and ports, until when.

    ``protocol == "any"`` means every protocol and port (``ports`` is then empty); ``tcp`` or
    ``udp`` with empty ``ports`` means every port of that protocol.
    """

    network: IPNetwork
    protocol: PeerProtocol = "any"
    ports: tuple[int, ...] = ()
    expires_at: datetime | None = None

    def permits(self, address: IPAddress, protocol: str | None, port: int | None) -> bool:
        if address not in self.network:
            return False
        if self.protocol == "any":
            return True
        if protocol is not None and protocol != self.protocol:
            return False
        return port is None or not self.ports or port in self.ports


@dataclass(frozen=True)
class PermittedPeers:
    """Every peer an isolated host may talk to, validated, collapsed and split by role."""

    platform: tuple[IPNetwork, ...]
    entries: tuple[AllowedEntry, ...]
    resolvers: tuple[IPAddress, ...]

    @property
    def allowlist(self) -> tuple[IPNetwork, ...]:
        """The allowlist networks open to every protocol and port."""
        return collapse(e.network for e in self.entries if e.protocol == "any")

    @property
    def restricted(self) -> tuple[AllowedEntry, ...]:
        """The allowlist entries limited to one protocol (and perhaps ports)."""
        return tuple(e for e in self.entries if e.protocol != "any")

    @property
    def all(self) -> tuple[IPNetwork, ...]:
        """Every network the host may reach in some way (protocol- or port-limited or not)."""
        return collapse(
            (
                *self.platform,
                *(e.network for e in self.entries),
                *(ipaddress.ip_network(a) for a in self.resolvers),
            )
        )

    def permits(
        self, address: IPAddress, protocol: str | None = None, port: int | None = None
    ) -> bool:
        """Whether the ruleset lets the host open ``protocol``/``port`` to ``address``
        (None: some protocol / some port)."""
        if any(address in network for network in self.platform):
            return True
        if any(e.permits(address, protocol, port) for e in self.entries):
            return True
        return address in self.resolvers and (
            (protocol is None or protocol in ("tcp", "udp")) and port in (None, 53)
        )


def permitted_peers(
    policy: FrozenPolicy, facts: HostFacts, now: datetime | None = None
) -> PermittedPeers:
    """Validate and collect the peers; strict and release policies carry no allowlist.

    The host's own platform addresses are configuration: a bad one raises InvalidAddressError.
    The policy's addresses passed the same rules at decode, so they cannot raise here. An entry
    whose ``expires_at`` is not after ``now`` (default: the current time) is left out: the
    agent never opens an expired entry (ENFORCEMENT.md "Expiry without a new policy").
    """
    for value in facts.platform_addresses:
        _host_address("platform_addresses", value)
    platform = _networks("platform", (*policy.platform, *facts.platform_addresses))
    at = now if now is not None else datetime.now(UTC)
    entries: list[AllowedEntry] = []
    if policy.mode == "standard":
        for peer in policy.allowed_outbound:
            if peer.expires_at is not None and peer.expires_at <= at:
                continue
            (network,) = _networks("allowed_outbound.address", (peer.address,))
            entries.append(
                AllowedEntry(
                    network=network,
                    protocol=peer.protocol,
                    ports=tuple(sorted(peer.ports)) if peer.protocol != "any" else (),
                    expires_at=peer.expires_at,
                )
            )
    resolvers = usable_resolvers(facts.dns_resolvers)
    return PermittedPeers(platform=platform, entries=tuple(entries), resolvers=resolvers)


def split_families(
    addresses: Iterable[IPAddress],
) -> tuple[list[ipaddress.IPv4Address], list[ipaddress.IPv6Address]]:
    items = list(addresses)
    v4 = [a for a in items if isinstance(a, ipaddress.IPv4Address)]
    v6 = [a for a in items if isinstance(a, ipaddress.IPv6Address)]
    return sorted(v4), sorted(v6)


def split_networks(
    networks: Iterable[IPNetwork],
) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
    items = list(networks)
    v4 = [n for n in items if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in items if isinstance(n, ipaddress.IPv6Network)]
    return sorted(v4), sorted(v6)
