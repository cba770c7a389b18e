"""Address validation shared by the renderers: nothing reaches a ruleset unless ``ipaddress`` accepts it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from shared.messages import FrozenPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidAddressError(ValueError):
    """An address in the policy or the host facts is not one a firewall rule may name."""

    def __init__(self, field: str, value: str, rule: str) -> None:
        super().__init__(f"{field}: {value!r} {rule}")
        self.field = field
        self.value = value
        self.rule = rule


def _host_address(field: str, value: str) -> IPAddress:
    # nft treats anything that is not an address literal as a hostname and resolves it, so a
    # typo would silently become "whatever DNS says": refuse before rendering.
    if not isinstance(value, str) or value != value.strip() or "/" in value:
        raise InvalidAddressError(field, str(value), "must be a single IP address, not a range")
    try:
        address = ipaddress.ip_address(value)
    except ValueError as exc:
        raise InvalidAddressError(field, value, "is not an IP address") from exc
    if address.is_unspecified or address.is_multicast:
        raise InvalidAddressError(field, value, "must be a unicast host address")
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address(
        "255.255.255.255"
    ):
        raise InvalidAddressError(field, value, "must be a unicast host address")
    return address


def _addresses(field: str, values: Iterable[str]) -> tuple[IPAddress, ...]:
    seen: dict[IPAddress, None] = {}
    for value in values:
        seen.setdefault(_host_address(field, value), None)
    return tuple(seen)


@dataclass(frozen=True)
class HostFacts:
    """What the host adds to every policy: the platform's addresses and its DNS resolvers."""

    platform_addresses: tuple[str, ...] = ()
    dns_resolvers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PermittedPeers:
    """Every address an isolated host may talk to, validated and split by role."""

    platform: tuple[IPAddress, ...]
    allowlist: tuple[ipaddress.IPv4Address, ...]
    resolvers: tuple[IPAddress, ...]

    @property
    def all(self) -> tuple[IPAddress, ...]:
        return tuple(dict.fromkeys((*self.platform, *self.allowlist, *self.resolvers)))


def permitted_peers(policy: FrozenPolicy, facts: HostFacts) -> PermittedPeers:
    """Validate and collect the peers; strict and release policies carry no allowlist."""
    platform = _addresses("platform", (*policy.platform, *facts.platform_addresses))
    resolvers = _addresses("dns_resolvers", facts.dns_resolvers)
    allowlist: list[ipaddress.IPv4Address] = []
    if policy.mode == "standard":
        for peer in policy.allowed_outbound:
            address = _host_address("allowed_outbound.address", peer.address)
            if not isinstance(address, ipaddress.IPv4Address):
                raise InvalidAddressError(
                    "allowed_outbound.address", peer.address, "must be an IPv4 address"
                )
            if address not in allowlist:
                allowlist.append(address)
    return PermittedPeers(platform=platform, allowlist=tuple(allowlist), resolvers=resolvers)


def split_families(
    addresses: Iterable[IPAddress],
) -> tuple[list[ipaddress.IPv4Address], list[ipaddress.IPv6Address]]:
    v4 = [a for a in addresses if isinstance(a, ipaddress.IPv4Address)]
    v6 = [a for a in addresses if isinstance(a, ipaddress.IPv6Address)]
    return sorted(v4), sorted(v6)
