"""Tooling Allowlist rules (DESIGN.md §1, §7): entry validation and the state transitions. No I/O."""

from __future__ import annotations

import enum
import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NoReturn

from pydantic import BaseModel, ConfigDict

from shared import addresses
from shared.messages import MAX_PORTS_PER_ENTRY, AllowlistEntry, EntryRevoked, PeerProtocol

NAME_MAX_LENGTH = 64
ADDRESS_MAX_LENGTH = 256

CLOUD_RMM_HINT = (
    "cloud RMMs with dynamic addresses are not supported; "
    "use the static IP address of a self-hosted server"
)


class SettingsError(Exception):
    """Base of the settings service's domain errors; ``field`` names the offending input."""

    field: str = ""
    rule: str = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EntryRejectedError(SettingsError):
    """An entry's name or address breaks a rule of DESIGN.md §7."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


class DuplicateAddressError(EntryRejectedError):
    """Another entry of the account already covers this one (DESIGN §7)."""

    def __init__(self, reach: str, covering: AllowlistEntry) -> None:
        super().__init__(
            "address",
            "duplicate",
            f"{reach} is already in this account's allowlist: entry {covering.name!r} "
            f"(id {covering.id}, {describe(covering)}) covers it",
        )
        self.covering = covering


class EntryLimitError(EntryRejectedError):
    """The allowlist already holds the maximum number of entries."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            "entries",
            "limit",
            f"the allowlist already holds the maximum of {limit} entries; remove one first",
        )


class EntryNotFoundError(SettingsError):
    """No entry with this id in the account's allowlist."""

    field = "entry_id"
    rule = "not_found"

    def __init__(self, entry_id: str) -> None:
        super().__init__(f"no entry {entry_id!r} in this account's allowlist")


class StaleVersionError(SettingsError):
    """``If-Match`` named a version that is no longer current."""

    field = "If-Match"
    rule = "stale_version"

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(
            f"If-Match names version {expected} but the allowlist is at version {current}; "
            "reload it and retry"
        )
        self.expected = expected
        self.current = current


class InvalidIfMatchError(SettingsError):
    """``If-Match`` is not a version (``"7"``, ``W/"7"``, ``7`` or ``*``)."""

    field = "If-Match"
    rule = "invalid"

    def __init__(self, raw: str) -> None:
        super().__init__(f'If-Match must be a settings version such as "7", got {raw[:40]!r}')


def _reject(rule: str, message: str) -> EntryRejectedError:
    return EntryRejectedError("address", rule, message)


_WHITESPACE_OR_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u2028-\u202f\u205f-\u206f\ufeff]")
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")
# IPv4 a-b, or IPv6 a-b (colons on both sides: "cafe-face" is a hostname, not a range).
_RANGE = re.compile(
    r"^([0-9.]+\s*-\s*[0-9.]+|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\s*-\s*[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*)$"
)
_WITH_PORT = re.compile(r"^[0-9.]+:[0-9]*$")
_BRACKETED = re.compile(r"^\[([^\]]*)\](:[0-9]*)?$")
_HOSTNAME_CHARS = re.compile(r"^[A-Za-z0-9.-]+$")
_HEX_OR_OCTAL_PART = re.compile(r"^0[xX][0-9A-Fa-f]*$")
_NOT_HEX_LETTER = re.compile(r"[g-zG-Z]")


def validate_address(
    raw: str,
    *,
    max_prefix_v4: int = addresses.MAX_PREFIX_V4,
    max_prefix_v6: int = addresses.MAX_PREFIX_V6,
) -> str:
    """The canonical form of a static unicast address or narrow prefix; else EntryRejectedError.

    Accepted (DESIGN.md §7): a dotted-quad IPv4 address or IPv4 CIDR no wider than
    ``max_prefix_v4``; an IPv6 address or prefix no wider than ``max_prefix_v6`` in any RFC 4291
    form. Host bits must be zero. The result is RFC 5952 for IPv6, and a ``/32`` or ``/128`` is
    the plain address. Each refusal has its own rule and message. RFC 1918 and ``fc00::/7``
    are allowed: self-hosted RMMs often sit on the partner's LAN.
    """
    if raw == "":
        _raise(_reject("required", "address is required: enter a static IP address"))
    if len(raw) > ADDRESS_MAX_LENGTH:
        _raise(_reject("too_long", f"address is longer than {ADDRESS_MAX_LENGTH} characters"))
    if _WHITESPACE_OR_INVISIBLE.search(raw) or not raw.isprintable():
        _raise(
            _reject(
                "whitespace",
                "address must not contain spaces, tabs, line breaks or invisible characters; "
                "enter it as e.g. 203.0.113.10 or 2001:db8::10",
            )
        )
    if not raw.isascii():
        _raise(
            _reject(
                "non_ascii",
                "address must use ASCII digits, letters a-f, dots and colons only "
                "(no look-alike characters)",
            )
        )
    if _RANGE.match(raw) or "*" in raw:
        _raise(
            _reject(
                "range",
                "address ranges and wildcards are not supported; enter one static address or "
                "a CIDR prefix (e.g. 198.51.100.0/24)",
            )
        )
    bracketed = _BRACKETED.match(raw)
    if (bracketed and bracketed.group(2) is not None) or _WITH_PORT.match(raw):
        _raise(
            _reject(
                "port",
                "enter the address without a port; give ports in the entry's ports field",
            )
        )
    if bracketed:
        _raise(_reject("brackets", "write the IPv6 address without brackets, e.g. 2001:db8::10"))
    base, slash, length = raw.partition("/")
    if "%" in raw:
        _raise(
            _reject(
                "zone_id",
                "zone ids (%eth0) are not accepted: a firewall rule cannot name an interface "
                "scope; enter a global or unique-local address",
            )
        )
    if slash and not (
        length.isdigit() and len(length) <= 3 and (length == "0" or not length.startswith("0"))
    ):
        _raise(
            _reject(
                "prefix_length",
                "give the prefix length as /LENGTH, a decimal number without leading zeros "
                "(e.g. /24 or /64); "
                "netmask forms such as /255.255.255.0 are not accepted",
            )
        )
    if ":" in base and _NOT_HEX_LETTER.search(base):
        _raise(_reject("hostname", f"hostnames and FQDNs are not accepted: {CLOUD_RMM_HINT}"))
    if ":" in base:
        network: ipaddress.IPv4Network | ipaddress.IPv6Network = _ipv6_network(
            raw, base, length if slash else None, max_prefix_v6
        )
    else:
        network = _ipv4_network(raw, base, length if slash else None, max_prefix_v4)
    _check_reserved(network)
    if network.prefixlen == network.max_prefixlen:
        canonical = str(network.network_address)
    else:
        canonical = str(network)
    # The renderability rules every boundary shares (policy model, agent): fail closed if the
    # guardrails above ever let through something an agent could not render.
    try:
        addresses.parse_address_or_prefix(
            canonical, max_prefix_v4=max_prefix_v4, max_prefix_v6=max_prefix_v6
        )
    except addresses.AddressRuleError as exc:
        _raise(_reject(exc.rule, f"address {exc.message}"))
    return canonical


def _ipv4_network(raw: str, base: str, length: str | None, limit: int) -> ipaddress.IPv4Network:
    if not _DIGITS_AND_DOTS.fullmatch(base):
        parts = base.split(".")
        if any(_HEX_OR_OCTAL_PART.match(p) for p in parts):
            _raise(
                _reject(
                    "non_decimal",
                    "hexadecimal forms are not accepted; write the address as four decimal "
                    "numbers, e.g. 10.0.0.1",
                )
            )
        if _HOSTNAME_CHARS.match(raw) and any(c.isalpha() for c in raw):
            _raise(
                _reject(
                    "hostname",
                    f"hostnames and FQDNs are not accepted: {CLOUD_RMM_HINT}",
                )
            )
        _raise(
            _reject(
                "not_ip",
                "address must be a dotted-quad IPv4 address such as 203.0.113.10, an IPv6 "
                "address such as 2001:db8::10, or a CIDR prefix of either",
            )
        )
    parts = base.split(".")
    if len(parts) != 4 or any(p == "" for p in parts):
        _raise(
            _reject(
                "shorthand",
                "write the address in full dotted-quad form with four numbers (e.g. 10.0.0.1); "
                "shorthand forms such as 10.1 are not accepted",
            )
        )
    if any(len(p) > 1 and p.startswith("0") for p in parts):
        _raise(
            _reject(
                "leading_zeros",
                "numbers with leading zeros (e.g. 010.0.0.1) are ambiguous (octal); "
                "write each number without leading zeros",
            )
        )
    if any(int(p) > 255 for p in parts):
        _raise(_reject("octet_range", "each of the four numbers must be between 0 and 255"))
    prefix = 32 if length is None else int(length)
    _check_prefix(prefix, 32, limit, 4)
    try:
        return ipaddress.IPv4Network(f"{base}/{prefix}", strict=True)
    except ValueError:
        _raise(_host_bits(base, prefix, 4))


def _ipv6_network(raw: str, base: str, length: str | None, limit: int) -> ipaddress.IPv6Network:
    try:
        address = ipaddress.IPv6Address(base)
    except ValueError:
        _raise(
            _reject(
                "not_ipv6",
                "address is not a valid IPv6 address (RFC 4291 text form, e.g. 2001:db8::10)",
            )
        )
    del address
    prefix = 128 if length is None else int(length)
    _check_prefix(prefix, 128, limit, 6)
    try:
        return ipaddress.IPv6Network(f"{base}/{prefix}", strict=True)
    except ValueError:
        _raise(_host_bits(base, prefix, 6))


def _check_prefix(prefix: int, max_length: int, limit: int, version: int) -> None:
    if prefix > max_length:
        _raise(
            _reject(
                "prefix_length",
                f"an IPv{version} prefix length is at most /{max_length}",
            )
        )
    if prefix < limit:
        _raise(
            _reject(
                "prefix_too_wide",
                f"IPv{version} prefixes may be no wider than /{limit} (got /{prefix}); "
                "list the RMM servers' own addresses or a narrower prefix",
            )
        )


def _host_bits(base: str, prefix: int, version: int) -> EntryRejectedError:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    return _reject(
        "host_bits",
        f"the prefix has host bits set; for /{prefix} enter its network address {network} "
        f"(or the single IPv{version} address without /{prefix})",
    )


# (range, rule, message), checked in order; a prefix is refused when it overlaps one.
_RESERVED_V4: tuple[tuple[ipaddress.IPv4Network, str, str], ...] = tuple(
    (ipaddress.IPv4Network(net), rule, message)
    for net, rule, message in (
        (
            "0.0.0.0/8",
            "this_network",
            "0.0.0.0/8 addresses mean 'this host/network' and cannot be a destination",
        ),
        (
            "255.255.255.255/32",
            "broadcast",
            "255.255.255.255 is the broadcast address, not a server",
        ),
        (
            "127.0.0.0/8",
            "loopback",
            "loopback addresses (127.0.0.0/8) point at the endpoint itself and are "
            "always allowed; enter the RMM server's address",
        ),
        (
            "169.254.0.0/16",
            "link_local",
            "link-local addresses (169.254.0.0/16) are not static server addresses",
        ),
        ("224.0.0.0/4", "multicast", "multicast addresses (224.0.0.0/4) are not a single server"),
        ("240.0.0.0/4", "reserved", "reserved addresses (240.0.0.0/4) cannot be used"),
        (
            "100.64.0.0/10",
            "shared_address_space",
            "shared address space (100.64.0.0/10) is carrier-grade NAT inside a provider's "
            "network, not a static server address",
        ),
        (
            "192.0.0.0/24",
            "ietf_protocol",
            "IETF protocol assignments (192.0.0.0/24) are not server addresses",
        ),
        (
            "198.18.0.0/15",
            "benchmarking",
            "benchmarking addresses (198.18.0.0/15) are for lab networks, not a server",
        ),
        (
            "192.88.99.0/24",
            "anycast",
            "the 6to4 relay anycast range (192.88.99.0/24) is not a single server",
        ),
    )
)
_RESERVED_V6: tuple[tuple[ipaddress.IPv6Network, str, str], ...] = tuple(
    (ipaddress.IPv6Network(net), rule, message)
    for net, rule, message in (
        ("::/128", "unspecified", "the unspecified address (::) is not a destination"),
        (
            "::1/128",
            "loopback",
            "the loopback address (::1) points at the endpoint itself and is always allowed; "
            "enter the RMM server's address",
        ),
        (
            "::ffff:0:0/96",
            "ipv4_mapped",
            "IPv4-mapped IPv6 addresses (::ffff:0:0/96) are IPv4 peers: give the IPv4 address",
        ),
        (
            "::/96",
            "ipv4_compatible",
            "IPv4-compatible IPv6 addresses (::/96, deprecated) are IPv4 peers: give the IPv4 "
            "address",
        ),
        (
            "fe80::/10",
            "link_local",
            "link-local addresses (fe80::/10) are not static server addresses",
        ),
        ("ff00::/8", "multicast", "multicast addresses (ff00::/8) are not a single server"),
        (
            "64:ff9b::/96",
            "nat64",
            "NAT64 addresses (64:ff9b::/96) translate to IPv4: give the IPv4 address",
        ),
        (
            "64:ff9b:1::/48",
            "nat64",
            "local-use NAT64 addresses (64:ff9b:1::/48) translate to IPv4: give the IPv4 address",
        ),
        (
            "2001::/32",
            "teredo",
            "Teredo addresses (2001::/32) are tunnel endpoints, not a static server address",
        ),
        (
            "2002::/16",
            "6to4",
            "6to4 addresses (2002::/16) are tunnel endpoints; give the server's IPv4 address",
        ),
    )
)


def _check_reserved(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    table: tuple[tuple[Any, str, str], ...] = (
        _RESERVED_V4 if isinstance(network, ipaddress.IPv4Network) else _RESERVED_V6
    )
    for reserved, rule, message in table:
        if network.overlaps(reserved):
            if network.prefixlen < network.max_prefixlen:
                message = f"the prefix {network} reaches into a refused range: {message}"
            _raise(_reject(rule, message))


MAX_PORTS = MAX_PORTS_PER_ENTRY
PROTOCOLS: tuple[PeerProtocol, ...] = ("tcp", "udp", "any")
MAX_EXPIRY = timedelta(days=90)


def validate_ports(raw: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """0 to 16 distinct ports 1-65535, sorted (empty: every port); else EntryRejectedError."""
    if len(raw) > MAX_PORTS:
        raise EntryRejectedError(
            "ports", "too_many", f"at most {MAX_PORTS} ports per entry (got {len(raw)})"
        )
    for index, port in enumerate(raw):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise EntryRejectedError(
                "ports",
                "port_range",
                f"ports[{index}] is {port!r}; each port must be an integer from 1 to 65535",
            )
    seen: set[int] = set()
    for port in raw:
        if port in seen:
            raise EntryRejectedError(
                "ports", "duplicate_port", f"port {port} is listed twice; list each port once"
            )
        seen.add(port)
    return tuple(sorted(raw))


def validate_protocol(raw: str, ports: tuple[int, ...]) -> PeerProtocol:
    """``tcp``, ``udp`` or ``any``; ports need ``tcp`` or ``udp``; else EntryRejectedError."""
    if raw not in PROTOCOLS:
        raise EntryRejectedError(
            "protocol",
            "unknown",
            f'protocol must be "tcp", "udp" or "any" (got {raw[:20]!r})',
        )
    protocol: PeerProtocol = "tcp" if raw == "tcp" else "udp" if raw == "udp" else "any"
    if ports and protocol == "any":
        raise EntryRejectedError(
            "protocol",
            "required_for_ports",
            'ports need protocol "tcp" or "udp"; "any" (the default) allows every protocol '
            "and port",
        )
    return protocol


def validate_expires_at(raw: str | None, now: datetime) -> datetime | None:
    """An RFC 3339 time with an offset, in the future and at most 90 days ahead (as UTC)."""
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        when = None
    if when is None or len(raw) < 19 or "T" not in raw.upper():
        raise EntryRejectedError(
            "expires_at",
            "format",
            "expires_at must be an RFC 3339 date and time, e.g. 2026-12-31T18:00:00Z",
        )
    if when.tzinfo is None or when.utcoffset() is None:
        raise EntryRejectedError(
            "expires_at",
            "timezone",
            "expires_at must carry a time zone offset (Z or +01:00), e.g. 2026-12-31T18:00:00Z",
        )
    try:
        when = when.astimezone(UTC)
    except OverflowError:
        # Year 1 or 9999 with an offset: outside what a date can hold, so far past or future.
        when = (
            datetime.min.replace(tzinfo=UTC)
            if when.year < 2000
            else datetime.max.replace(tzinfo=UTC)
        )
    if when <= now:
        raise EntryRejectedError(
            "expires_at", "past", f"expires_at {raw} is not in the future; give a later time"
        )
    if when > now + MAX_EXPIRY:
        raise EntryRejectedError(
            "expires_at",
            "too_far",
            f"expires_at may be at most {MAX_EXPIRY.days} days ahead; leave it empty for an "
            "entry that does not expire",
        )
    return when


def covers(outer: AllowlistEntry, inner: AllowlistEntry) -> bool:
    """True when ``outer`` already allows everything ``inner`` would, for at least as long.

    Addresses: inner's inside outer's. Protocol: the same, or outer ``any``. Ports: outer's
    empty (every port) or a superset of inner's. Time: outer does not expire before inner.
    """
    outer_net = ipaddress.ip_network(outer.address)
    inner_net = ipaddress.ip_network(inner.address)
    if outer_net.version != inner_net.version:
        return False
    if not inner_net.subnet_of(outer_net):  # type: ignore[arg-type]
        return False
    if outer.protocol != "any" and outer.protocol != inner.protocol:
        return False
    if outer.ports and not (inner.ports and set(inner.ports) <= set(outer.ports)):
        return False
    if outer.expires_at is not None:
        return inner.expires_at is not None and inner.expires_at <= outer.expires_at
    return True


def describe(entry: AllowlistEntry) -> str:
    """``203.0.113.10 tcp/8041,8042 until …``: an entry's reach in one line."""
    reach = entry.address
    if entry.protocol != "any":
        reach += f" {entry.protocol}" + (
            "/" + ",".join(map(str, entry.ports)) if entry.ports else ""
        )
    if entry.expires_at is not None:
        reach += f" until {entry.expires_at.isoformat().replace('+00:00', 'Z')}"
    return reach


def _raise(error: EntryRejectedError) -> NoReturn:
    raise error


def validate_name(raw: str) -> str:
    """The trimmed name if it has 1 to 64 printable characters; else EntryRejectedError."""
    name = raw.strip()
    if not name:
        raise EntryRejectedError("name", "required", "name must not be empty")
    if len(name) > NAME_MAX_LENGTH:
        raise EntryRejectedError(
            "name",
            "too_long",
            f"name must be at most {NAME_MAX_LENGTH} characters after trimming (got {len(name)})",
        )
    if _looks_blank(name):
        raise EntryRejectedError(
            "name",
            "blank",
            "name must contain a visible character (not only fillers, blanks or combining marks)",
        )
    if not name.isprintable():
        raise EntryRejectedError(
            "name",
            "not_printable",
            "name must contain printable characters only (no control or invisible characters)",
        )
    return name


# Letters and symbols Unicode counts as printable that render as nothing: Hangul fillers, the
# braille blank, Khmer inherent vowels, and the Hangul/halfwidth fillers' relatives.
_FILLERS = frozenset("\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")
# Marks (alone they attach to nothing), format characters (zero-width, joiners, bidi
# controls, tags), separators and controls, and unassigned or private-use code points.
_INVISIBLE_CATEGORIES = frozenset(
    {"Mn", "Mc", "Me", "Cf", "Cc", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}
)


def _looks_blank(name: str) -> bool:
    """True when no character of ``name`` would show: a list row that reads as empty."""
    return all(
        c in _FILLERS or c.isspace() or unicodedata.category(c) in _INVISIBLE_CATEGORIES
        for c in name
    )


def parse_if_match(raw: str | None) -> int | None:
    """The version an ``If-Match`` header names; None for absent or ``*``."""
    if raw is None:
        return None
    value = raw.strip()
    if value == "*":
        return None
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise InvalidIfMatchError(raw)
    return int(value)


def entry_summary(entry: AllowlistEntry) -> dict[str, Any]:
    """``{id, name, address}`` and, when not their defaults, ports, protocol and expiry."""
    summary: dict[str, Any] = {"id": entry.id, "name": entry.name, "address": entry.address}
    if entry.ports:
        summary["ports"] = list(entry.ports)
    if entry.protocol != "any":
        summary["protocol"] = entry.protocol
    if entry.expires_at is not None:
        summary["expires_at"] = entry.expires_at.isoformat()
    return summary


class Allowlist(BaseModel):
    """An account's Tooling Allowlist at one version (version 0: never changed, switched off)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    account_id: str
    enabled: bool = False
    entries: tuple[AllowlistEntry, ...] = ()
    version: int = 0
    updated_at: datetime | None = None

    def summary(self) -> dict[str, Any]:
        """The before/after state an audit record carries."""
        return {
            "enabled": self.enabled,
            "version": self.version,
            "entries": [entry_summary(e) for e in self.entries],
        }


@dataclass(frozen=True)
class Change:
    """A new allowlist state and what the audit trail says about it."""

    action: str
    before: Allowlist
    after: Allowlist
    entry: AllowlistEntry | None = None
    detail: str = ""
    # Entries this change revokes ("compromised"): the event tells isolation to cut them.
    revoked: tuple[EntryRevoked, ...] = ()


def check_version(current: Allowlist, expected: int | None) -> None:
    if expected is not None and expected != current.version:
        raise StaleVersionError(expected, current.version)


def _next(current: Allowlist, now: datetime, **changes: Any) -> Allowlist:
    return current.model_copy(update={**changes, "version": current.version + 1, "updated_at": now})


def set_enabled(current: Allowlist, enabled: bool, now: datetime) -> Change | None:
    """Switch Tooling Connections on or off; None when it already is."""
    if current.enabled == enabled:
        return None
    return Change(
        action="allowlist.enable" if enabled else "allowlist.disable",
        before=current,
        after=_next(current, now, enabled=enabled),
    )


def _check_unique(current: Allowlist, entry: AllowlistEntry) -> None:
    for other in current.entries:
        if other.id != entry.id and covers(other, entry):
            raise DuplicateAddressError(describe(entry), other)


@dataclass(frozen=True)
class EntryLimits:
    """The configurable address guardrails (HOSTISO_ALLOWLIST_MAX_PREFIX_V4/V6)."""

    max_prefix_v4: int = addresses.MAX_PREFIX_V4
    max_prefix_v6: int = addresses.MAX_PREFIX_V6


class Keep(enum.Enum):
    KEEP = "keep"


KEEP: Final = Keep.KEEP
"""``update_entry``: leave ``expires_at`` as it is (``None`` removes the expiry)."""


def _build_entry(
    base: AllowlistEntry,
    *,
    name: str | None,
    address: str | None,
    ports: list[int] | tuple[int, ...] | None,
    protocol: str | None,
    expires_at: str | Keep | None,
    now: datetime,
    limits: EntryLimits,
) -> AllowlistEntry:
    clean_address = (
        validate_address(
            address, max_prefix_v4=limits.max_prefix_v4, max_prefix_v6=limits.max_prefix_v6
        )
        if address is not None
        else base.address
    )
    clean_name = validate_name(name) if name is not None else base.name
    clean_ports = validate_ports(ports) if ports is not None else base.ports
    clean_protocol = validate_protocol(
        protocol if protocol is not None else base.protocol, clean_ports
    )
    clean_expiry = base.expires_at if expires_at is KEEP else validate_expires_at(expires_at, now)
    return base.model_copy(
        update={
            "name": clean_name,
            "address": clean_address,
            "ports": clean_ports,
            "protocol": clean_protocol,
            "expires_at": clean_expiry,
        }
    )


def add_entry(
    current: Allowlist,
    *,
    name: str,
    address: str,
    entry_id: str,
    created_by: str,
    now: datetime,
    max_entries: int,
    ports: list[int] | tuple[int, ...] | None = None,
    protocol: str | None = None,
    expires_at: str | None = None,
    limits: EntryLimits | None = None,
) -> Change:
    """Append a validated entry; a covered entry (409) and the entry limit (422) are refused.

    ``{name, address}`` alone is what it always was: every port and protocol, no expiry.
    """
    limits = limits or EntryLimits()
    blank = AllowlistEntry(
        id=entry_id, name="-", address="0.0.0.0", created_at=now, created_by=created_by
    )
    entry = _build_entry(
        blank,
        name=name,
        address=address,
        ports=ports if ports is not None else (),
        protocol=protocol if protocol is not None else "any",
        expires_at=expires_at,
        now=now,
        limits=limits,
    )
    _check_unique(current, entry)
    if len(current.entries) >= max_entries:
        raise EntryLimitError(max_entries)
    return Change(
        action="allowlist.entry.add",
        before=current,
        after=_next(current, now, entries=(*current.entries, entry)),
        entry=entry,
        detail=f"added {entry.name!r} {describe(entry)}",
    )


def find_entry(current: Allowlist, entry_id: str) -> AllowlistEntry:
    for entry in current.entries:
        if entry.id == entry_id:
            return entry
    raise EntryNotFoundError(entry_id)


def update_entry(
    current: Allowlist,
    entry_id: str,
    *,
    name: str | None,
    address: str | None,
    now: datetime,
    ports: list[int] | tuple[int, ...] | None = None,
    protocol: str | None = None,
    expires_at: str | Keep | None = KEEP,
    limits: EntryLimits | None = None,
) -> Change | None:
    """Change an entry's name, address, ports, protocol or expiry (the rules of a new entry);
    None when nothing changes."""
    entry = find_entry(current, entry_id)
    updated = _build_entry(
        entry,
        name=name,
        address=address,
        ports=ports,
        protocol=protocol,
        expires_at=expires_at,
        now=now,
        limits=limits or EntryLimits(),
    )
    _check_unique(current, updated)
    if updated == entry:
        return None
    entries = tuple(updated if e.id == entry_id else e for e in current.entries)
    return Change(
        action="allowlist.entry.update",
        before=current,
        after=_next(current, now, entries=entries),
        entry=updated,
        detail=f"{entry.name!r} {describe(entry)} -> {updated.name!r} {describe(updated)}",
    )


def remove_entry(current: Allowlist, entry_id: str, now: datetime) -> Change:
    entry = find_entry(current, entry_id)
    return Change(
        action="allowlist.entry.remove",
        before=current,
        after=_next(current, now, entries=tuple(e for e in current.entries if e.id != entry_id)),
        entry=entry,
        detail=f"removed {entry.name!r} {describe(entry)}",
    )


def history_delta(change: Change) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What one change changed, for its history record: the entry or the switch, not the lists.

    An entry change gives the entry before and after (None where it did not exist); a switch
    gives ``{"enabled": ...}`` on both sides. A record stays small however long the list is.
    """
    if change.entry is None:
        return {"enabled": change.before.enabled}, {"enabled": change.after.enabled}
    entry_id = change.entry.id

    def compact(allowlist: Allowlist) -> dict[str, Any] | None:
        for entry in allowlist.entries:
            if entry.id == entry_id:
                return entry_summary(entry)
        return None

    return compact(change.before), compact(change.after)


REVOKE_REASON_MAX_LENGTH = 1000


def revoke_entry(
    current: Allowlist, entry_id: str, *, revocation_id: str, reason: str, now: datetime
) -> Change:
    """Remove a compromised entry and record why: isolation cuts it from every isolated endpoint.

    Unlike a removal (which leaves frozen policies alone, guarantee 3), the event of this
    version names the entry as revoked (guarantee 14: only ever removes access).
    """
    entry = find_entry(current, entry_id)
    clean_reason = reason.strip()
    if not clean_reason:
        raise EntryRejectedError(
            "reason", "required", "say why the entry is revoked (e.g. 'RMM server compromised')"
        )
    if len(clean_reason) > REVOKE_REASON_MAX_LENGTH:
        raise EntryRejectedError(
            "reason", "too_long", f"reason must be at most {REVOKE_REASON_MAX_LENGTH} characters"
        )
    return Change(
        action="allowlist.entry.revoke",
        before=current,
        after=_next(current, now, entries=tuple(e for e in current.entries if e.id != entry_id)),
        entry=entry,
        detail=f"revoked {entry.name!r} {entry.address}: {clean_reason}",
        revoked=(EntryRevoked(revocation_id=revocation_id, entry=entry, reason=clean_reason),),
    )
