"""Tooling Allowlist rules (DESIGN.md §1, §7): entry validation and the state transitions. No I/O."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict

from shared.messages import AllowlistEntry, EntryRevoked

NAME_MAX_LENGTH = 64
ADDRESS_MAX_LENGTH = 256

CLOUD_RMM_HINT = (
    "cloud RMMs with dynamic addresses are not supported; "
    "use the static IPv4 address of a self-hosted server"
)


class SettingsError(Exception):
    """Base of the settings service's domain errors; ``field`` names the offending input."""

    status = 400
    field: str = ""
    rule: str = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EntryRejectedError(SettingsError):
    """An entry's name or address breaks a rule of DESIGN.md §7."""

    status = 422

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


class DuplicateAddressError(EntryRejectedError):
    """The account already has an entry with this address."""

    status = 409

    def __init__(self, address: str, existing_name: str) -> None:
        super().__init__(
            "address",
            "duplicate",
            f"address {address} is already in this account's allowlist (entry {existing_name!r}); "
            "each address may appear once",
        )


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

    status = 404
    field = "entry_id"
    rule = "not_found"

    def __init__(self, entry_id: str) -> None:
        super().__init__(f"no entry {entry_id!r} in this account's allowlist")


class StaleVersionError(SettingsError):
    """``If-Match`` named a version that is no longer current."""

    status = 412
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

    status = 422
    field = "If-Match"
    rule = "invalid"

    def __init__(self, raw: str) -> None:
        super().__init__(f'If-Match must be a settings version such as "7", got {raw[:40]!r}')


def _reject(rule: str, message: str) -> EntryRejectedError:
    return EntryRejectedError("address", rule, message)


_WHITESPACE_OR_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u2028-\u202f\u205f-\u206f\ufeff]")
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")
_RANGE = re.compile(r"^[0-9.]+\s*-\s*[0-9.]+$")
_WITH_PORT = re.compile(r"^[0-9.]+:[0-9]*$")
_HOSTNAME_CHARS = re.compile(r"^[A-Za-z0-9.-]+$")
_HEX_OR_OCTAL_PART = re.compile(r"^0[xX][0-9A-Fa-f]*$")


def validate_address(raw: str) -> str:
    """The address if it is a single static unicast IPv4 in dotted-quad form; else EntryRejectedError.

    Each refusal has its own rule and message (DESIGN.md §7). RFC 1918 addresses are allowed:
    self-hosted RMMs often sit on the partner's LAN.
    """
    if raw == "":
        _raise(_reject("required", "address is required: enter a static IPv4 address"))
    if len(raw) > ADDRESS_MAX_LENGTH:
        _raise(_reject("too_long", f"address is longer than {ADDRESS_MAX_LENGTH} characters"))
    if _WHITESPACE_OR_INVISIBLE.search(raw) or not raw.isprintable():
        _raise(
            _reject(
                "whitespace",
                "address must not contain spaces, tabs, line breaks or invisible characters; "
                "enter it as digits and dots only, e.g. 203.0.113.10",
            )
        )
    if not raw.isascii():
        _raise(
            _reject(
                "non_ascii",
                "address must use ASCII digits and dots only (no look-alike characters)",
            )
        )
    if "/" in raw:
        _raise(
            _reject(
                "cidr",
                "CIDR ranges are not supported; enter one static IPv4 address (e.g. 203.0.113.10)",
            )
        )
    if _RANGE.match(raw) or "*" in raw:
        _raise(
            _reject(
                "range",
                "address ranges and wildcards are not supported; enter one static IPv4 address",
            )
        )
    if _WITH_PORT.match(raw):
        _raise(
            _reject(
                "port",
                "enter the address without a port; the allowlist allows every port of the address",
            )
        )
    if ":" in raw:
        try:
            ipaddress.IPv6Address(raw.strip("[]"))
        except ValueError:
            pass
        else:
            _raise(_reject("ipv6", "IPv6 addresses are not supported; enter a static IPv4 address"))
    if not _DIGITS_AND_DOTS.fullmatch(raw):
        parts = raw.split(".")
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
                "not_ipv4",
                "address must be a dotted-quad IPv4 address such as 203.0.113.10",
            )
        )
    parts = raw.split(".")
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
    address = ipaddress.IPv4Address(raw)
    _check_unicast(address)
    return str(address)


def _check_unicast(address: ipaddress.IPv4Address) -> None:
    if address in _THIS_NETWORK:
        _raise(
            _reject(
                "this_network",
                "0.0.0.0/8 addresses mean 'this host/network' and cannot be a destination",
            )
        )
    if address == _BROADCAST:
        _raise(_reject("broadcast", "255.255.255.255 is the broadcast address, not a server"))
    if address.is_loopback:
        _raise(
            _reject(
                "loopback",
                "loopback addresses (127.0.0.0/8) point at the endpoint itself and are "
                "always allowed; enter the RMM server's address",
            )
        )
    if address.is_link_local:
        _raise(
            _reject(
                "link_local",
                "link-local addresses (169.254.0.0/16) are not static server addresses",
            )
        )
    if address.is_multicast:
        _raise(_reject("multicast", "multicast addresses (224.0.0.0/4) are not a single server"))
    if address in _RESERVED:
        _raise(_reject("reserved", "reserved addresses (240.0.0.0/4) cannot be used"))
    if address in _SHARED:
        _raise(
            _reject(
                "shared_address_space",
                "shared address space (100.64.0.0/10) is carrier-grade NAT inside a provider's "
                "network, not a static server address",
            )
        )
    if address in _IETF_PROTOCOL:
        _raise(
            _reject(
                "ietf_protocol",
                "IETF protocol assignments (192.0.0.0/24) are not server addresses",
            )
        )
    if address in _BENCHMARKING:
        _raise(
            _reject(
                "benchmarking",
                "benchmarking addresses (198.18.0.0/15) are for lab networks, not a server",
            )
        )
    if address in _RELAY_ANYCAST:
        _raise(
            _reject(
                "anycast",
                "the 6to4 relay anycast range (192.88.99.0/24) is not a single server",
            )
        )


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_RESERVED = ipaddress.IPv4Network("240.0.0.0/4")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")
_BENCHMARKING = ipaddress.IPv4Network("198.18.0.0/15")
_RELAY_ANYCAST = ipaddress.IPv4Network("192.88.99.0/24")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


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
            "entries": [{"id": e.id, "name": e.name, "address": e.address} for e in self.entries],
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


def _check_unique(current: Allowlist, address: str, except_id: str | None = None) -> None:
    for entry in current.entries:
        if entry.address == address and entry.id != except_id:
            raise DuplicateAddressError(address, entry.name)


def add_entry(
    current: Allowlist,
    *,
    name: str,
    address: str,
    entry_id: str,
    created_by: str,
    now: datetime,
    max_entries: int,
) -> Change:
    """Append a validated entry; duplicates (409) and the entry limit (422) are refused."""
    clean_address = validate_address(address)
    clean_name = validate_name(name)
    _check_unique(current, clean_address)
    if len(current.entries) >= max_entries:
        raise EntryLimitError(max_entries)
    entry = AllowlistEntry(
        id=entry_id, name=clean_name, address=clean_address, created_at=now, created_by=created_by
    )
    return Change(
        action="allowlist.entry.add",
        before=current,
        after=_next(current, now, entries=(*current.entries, entry)),
        entry=entry,
        detail=f"added {clean_name!r} {clean_address}",
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
) -> Change | None:
    """Rename and/or readdress an entry; None when nothing changes."""
    entry = find_entry(current, entry_id)
    clean_address = validate_address(address) if address is not None else entry.address
    clean_name = validate_name(name) if name is not None else entry.name
    _check_unique(current, clean_address, except_id=entry_id)
    if clean_address == entry.address and clean_name == entry.name:
        return None
    updated = entry.model_copy(update={"name": clean_name, "address": clean_address})
    entries = tuple(updated if e.id == entry_id else e for e in current.entries)
    return Change(
        action="allowlist.entry.update",
        before=current,
        after=_next(current, now, entries=entries),
        entry=updated,
        detail=f"{entry.name!r} {entry.address} -> {clean_name!r} {clean_address}",
    )


def remove_entry(current: Allowlist, entry_id: str, now: datetime) -> Change:
    entry = find_entry(current, entry_id)
    return Change(
        action="allowlist.entry.remove",
        before=current,
        after=_next(current, now, entries=tuple(e for e in current.entries if e.id != entry_id)),
        entry=entry,
        detail=f"removed {entry.name!r} {entry.address}",
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
                return {"id": entry.id, "name": entry.name, "address": entry.address}
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
