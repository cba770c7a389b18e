"""Address literal rules shared by every boundary: what a firewall rule can name (DESIGN §5, §7).

These are *renderability* rules, not the settings service's business guardrails (DESIGN §7
refuses more: private-use ranges it deems useless, IPv6 for now). Config, the policy model and
the agent's renderers use them so that nothing one boundary accepts can fail another's
``nft -f`` (ENFORCEMENT.md: one bad literal fails the whole transaction, and nft treats a
non-literal as a hostname to resolve).
"""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# DESIGN §7 defaults of HOSTISO_ALLOWLIST_MAX_PREFIX_V4/V6 (the settings service's guardrail).
MAX_PREFIX_V4 = 24
MAX_PREFIX_V6 = 64
# The widest prefix any configuration of those settings may allow (their lower bounds): what
# the policy model and the agent accept by default, so that whatever a configured settings
# service issued, every agent can render.
WIDEST_PREFIX_V4 = 16
WIDEST_PREFIX_V6 = 32

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class AddressRuleError(ValueError):
    """An address literal breaks one rule; ``rule`` is a stable code, the text says why."""

    def __init__(self, value: object, rule: str, message: str) -> None:
        super().__init__(f"{str(value)[:80]!r} {message}")
        self.value = value
        self.rule = rule
        self.message = message


def _literal(value: object) -> str:
    if not isinstance(value, str):
        raise AddressRuleError(value, "not_text", "must be an IP address written as text")
    if not value or not value.isascii() or not value.isprintable() or value != value.strip():
        raise AddressRuleError(
            value, "not_literal", "must be a plain IP address literal (ASCII, no spaces)"
        )
    if any(c.isspace() for c in value):
        raise AddressRuleError(
            value, "not_literal", "must be a plain IP address literal (ASCII, no spaces)"
        )
    if "%" in value:
        # nft has no syntax for a scoped address: `fe80::1%eth0` fails the whole transaction.
        raise AddressRuleError(
            value, "zone_id", "has a zone id (%…), which a firewall rule cannot name"
        )
    return value


def _check_unicast(value: str, address: IPAddress) -> None:
    if address.is_unspecified:
        raise AddressRuleError(value, "unspecified", "is the unspecified address, not a peer")
    if address.is_multicast:
        raise AddressRuleError(value, "multicast", "is a multicast address, not a single peer")
    if address == _BROADCAST:
        raise AddressRuleError(value, "broadcast", "is the broadcast address, not a peer")
    if isinstance(address, ipaddress.IPv6Address) and address in _IPV4_MAPPED:
        raise AddressRuleError(
            value,
            "ipv4_mapped",
            "is an IPv4-mapped IPv6 address (::ffff:0:0/96); give the IPv4 address",
        )


def parse_host_address(value: object) -> IPAddress:
    """One unicast IPv4/IPv6 address literal without a zone id or prefix; else AddressRuleError."""
    text = _literal(value)
    if "/" in text:
        raise AddressRuleError(text, "prefix", "must be a single IP address, not a prefix")
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise AddressRuleError(text, "not_ip", "is not an IP address") from exc
    _check_unicast(text, address)
    return address


def parse_address_or_prefix(
    value: object,
    *,
    max_prefix_v4: int = WIDEST_PREFIX_V4,
    max_prefix_v6: int = WIDEST_PREFIX_V6,
) -> IPNetwork:
    """A unicast address (as a /32 or /128) or a narrow prefix (host bits zero); else an error.

    ``max_prefix_v4``/``max_prefix_v6`` are the widest prefix lengths accepted (the settings
    service passes its configured limits; the defaults are the widest any configuration allows).

    Every policy the services and agents decode checks each of its peers here (about 10 us per
    address, most of a policy's decode): the answer for a string is pure and immutable, so it is
    remembered. A refusal is not cached (it raises again, with the same message, each time).
    """
    if isinstance(value, str):
        return _parse_text(value, max_prefix_v4, max_prefix_v6)
    return _parse(value, max_prefix_v4, max_prefix_v6)


@functools.lru_cache(maxsize=16_384)
def _parse_text(value: str, max_prefix_v4: int, max_prefix_v6: int) -> IPNetwork:
    return _parse(value, max_prefix_v4, max_prefix_v6)


def _parse(value: object, max_prefix_v4: int, max_prefix_v6: int) -> IPNetwork:
    text = _literal(value)
    if "/" not in text:
        return ipaddress.ip_network(parse_host_address(text))
    base, _, length = text.partition("/")
    if not (length.isdigit() and length.isascii()) or len(length) > 3:
        # ipaddress also takes netmask forms (/255.255.255.0); one spelling keeps hashes stable.
        raise AddressRuleError(text, "prefix_length", "must give the prefix as /LENGTH")
    address = parse_host_address(base)
    limit = max_prefix_v4 if address.version == 4 else max_prefix_v6
    if not limit <= int(length) <= address.max_prefixlen:
        raise AddressRuleError(
            text,
            "prefix_too_wide",
            f"prefix must be /{limit} to /{address.max_prefixlen} for IPv{address.version}",
        )
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise AddressRuleError(
            text, "host_bits", "has host bits set; give the network address of the prefix"
        ) from exc
    for edge in (network.network_address, network.broadcast_address):
        _check_unicast(text, edge)
    return network
