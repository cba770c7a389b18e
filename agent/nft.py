"""Pure nftables renderer: a frozen policy and the host's facts become one atomic ``nft -f`` file."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.addresses import (
    AllowedEntry,
    HostFacts,
    IPAddress,
    IPNetwork,
    PermittedPeers,
    permitted_peers,
    split_families,
    split_networks,
)
from shared.messages import FrozenPolicy

_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


class InvalidTableNameError(ValueError):
    """The nftables table name is not a plain identifier."""


def check_table_name(name: str) -> str:
    if not _TABLE_NAME.match(name):
        raise InvalidTableNameError(
            f"table name {name!r}: letters, digits and '_' only, starting with a letter, at most 32"
        )
    return name


def rules_sha256(ruleset: str) -> str:
    """The hash the agent reports as ``rules_sha256``: SHA-256 of the exact text it applied."""
    return hashlib.sha256(ruleset.encode()).hexdigest()


def _element(peer: IPAddress | IPNetwork) -> str:
    if isinstance(peer, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(peer)
    # A host as a plain element keeps the common case's text (and hash) as it always was.
    return str(peer.network_address) if peer.prefixlen == peer.max_prefixlen else str(peer)


def _set(name: str, kind: str, peers: Iterable[IPAddress | IPNetwork]) -> list[str]:
    items = list(peers)
    lines = [f"\tset {name} {{", f"\t\ttype {kind}"]
    if any(_is_prefix(p) for p in items):
        # Prefixes need an interval set; the peers were collapsed, so no two intervals overlap.
        lines.append("\t\tflags interval")
    elements = ", ".join(_element(p) for p in items)
    if elements:
        lines.append(f"\t\telements = {{ {elements} }}")
    lines.append("\t}")
    return lines


def _is_prefix(peer: IPAddress | IPNetwork) -> bool:
    return (
        isinstance(peer, ipaddress.IPv4Network | ipaddress.IPv6Network)
        and peer.prefixlen < peer.max_prefixlen
    )


# --- allowlist v2: protocol/port sets and element timeouts -------------------------------

_EXPIRING = re.compile(r' timeout [0-9]+s comment "expires (?P<at>[^"]+)"$')
_ELEMENTS = "\t\telements = { "


def _seconds_left(expires_at: datetime, now: datetime) -> int:
    """Whole seconds until ``expires_at``, rounded down (an entry closes early, never late)."""
    return int((expires_at - now).total_seconds())


def _timeout(seconds: int, expires_at: datetime) -> str:
    # The absolute time rides along as the element's comment, so a stored ruleset loaded again
    # later (rollback, restart) gets its timeouts recomputed instead of re-opening an entry.
    at = expires_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return f' timeout {seconds}s comment "expires {at}"'


def retime(ruleset: str, now: datetime | None = None) -> str:
    """``ruleset`` with every expiring element's timeout recomputed for ``now``; elements
    already expired are left out. Text without expiring elements comes back unchanged."""
    at = now if now is not None else datetime.now(UTC)
    lines: list[str] = []
    for line in ruleset.split("\n"):
        if not (line.startswith(_ELEMENTS) and line.endswith(" }") and "timeout" in line):
            lines.append(line)
            continue
        kept: list[str] = []
        for item in line[len(_ELEMENTS) : -2].split(", "):
            match = _EXPIRING.search(item)
            if match is None:
                kept.append(item)
                continue
            expires_at = datetime.fromisoformat(match["at"])
            left = _seconds_left(expires_at, at)
            if left > 0:
                kept.append(item[: match.start()] + _timeout(left, expires_at))
        if kept:
            lines.append(_ELEMENTS + ", ".join(kept) + " }")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Element:
    network: IPNetwork
    expires_at: datetime | None
    port: int | None = None


def _lifetime_order(item: tuple[IPNetwork, datetime | None]) -> tuple[int, float, int, int]:
    network, expires_at = item
    # Longest-lived first (no expiry before any expiry), then by address, wider first.
    lasting = -expires_at.timestamp() if expires_at is not None else 0.0
    return (expires_at is not None, lasting, int(network.network_address), network.prefixlen)


def _disjoint(
    items: Iterable[tuple[IPNetwork, datetime | None]],
) -> list[tuple[IPNetwork, datetime | None]]:
    """Non-overlapping pieces with the union's reach; where entries overlap, the piece lives as
    long as the longest-lived of them (nft interval sets refuse overlapping elements).

    Without expiries this is ``collapse``: a network inside another is dropped.
    """
    placed: list[tuple[IPNetwork, datetime | None]] = []
    for network, expires_at in sorted(items, key=_lifetime_order):
        pieces: list[IPNetwork] = [network]
        for other, _ in placed:
            if other.version != network.version:
                continue
            remaining: list[IPNetwork] = []
            for piece in pieces:
                if piece.subnet_of(other):  # type: ignore[arg-type]
                    continue
                if other.subnet_of(piece):  # type: ignore[arg-type]
                    remaining.extend(piece.address_exclude(other))  # type: ignore[arg-type]
                else:
                    remaining.append(piece)
            pieces = remaining
        placed.extend((piece, expires_at) for piece in pieces)
    return sorted(placed, key=lambda i: (int(i[0].network_address), i[0].prefixlen))


@dataclass(frozen=True)
class _AllowSet:
    name: str
    kind: str
    elements: tuple[_Element, ...]


def _allow_sets(entries: Iterable[AllowedEntry], now: datetime) -> list[_AllowSet]:
    """The allowlist's sets: per family, ``any`` (address only), ``tcp``/``udp`` every port
    (address only), ``tcp``/``udp`` ports (address . port). Expired entries are left out."""
    live = [e for e in entries if e.expires_at is None or _seconds_left(e.expires_at, now) > 0]
    sets: list[_AllowSet] = []
    for family, suffix, kind in ((4, "4", "ipv4_addr"), (6, "6", "ipv6_addr")):
        mine = [e for e in live if e.network.version == family]
        for protocol in ("any", "tcp", "udp"):
            plain = [
                (e.network, e.expires_at) for e in mine if e.protocol == protocol and not e.ports
            ]
            name = f"allowlist{suffix}" if protocol == "any" else f"allowlist{suffix}_{protocol}"
            sets.append(_AllowSet(name, kind, tuple(_Element(n, x) for n, x in _disjoint(plain))))
            if protocol == "any":
                continue
            by_port: dict[int, list[tuple[IPNetwork, datetime | None]]] = {}
            for e in mine:
                if e.protocol == protocol:
                    for port in e.ports:
                        by_port.setdefault(port, []).append((e.network, e.expires_at))
            elements = [
                _Element(n, x, port)
                for port in sorted(by_port)
                for n, x in _disjoint(by_port[port])
            ]
            elements.sort(key=lambda el: (int(el.network.network_address), el.network.prefixlen))
            sets.append(_AllowSet(f"{name}_ports", f"{kind} . inet_service", tuple(elements)))
    return sets


def _render_allow_set(allow: _AllowSet, now: datetime) -> list[str]:
    flags = []
    if any(_is_prefix(el.network) for el in allow.elements):
        flags.append("interval")
    if any(el.expires_at is not None for el in allow.elements):
        flags.append("timeout")
    lines = [f"\tset {allow.name} {{", f"\t\ttype {allow.kind}"]
    if flags:
        lines.append(f"\t\tflags {', '.join(flags)}")
    items: list[str] = []
    for el in allow.elements:
        text = _element(el.network) + (f" . {el.port}" if el.port is not None else "")
        if el.expires_at is not None:
            text += _timeout(_seconds_left(el.expires_at, now), el.expires_at)
        items.append(text)
    if items:
        lines.append(f"{_ELEMENTS}{', '.join(items)} }}")
    lines.append("\t}")
    return lines


def render_release(table: str) -> str:
    """Release: delete our table; ``add`` first so the transaction succeeds when it is absent."""
    check_table_name(table)
    return f"add table inet {table}\ndelete table inet {table}\n"


def render_ruleset(
    policy: FrozenPolicy,
    facts: HostFacts,
    table: str = "hostiso",
    *,
    now: datetime | None = None,
) -> str:
    """The whole table for an isolation policy, or the release for ``mode: none``.

    ``now`` (default: the current time) is the apply time: an entry's ``expires_at`` becomes
    its set elements' ``timeout``, so the kernel closes it on time without a new policy (even
    while the agent is offline); an entry already expired is not rendered.
    """
    if policy.mode == "none":
        return render_release(table)
    check_table_name(table)
    at = now if now is not None else datetime.now(UTC)
    return _render_isolation(permitted_peers(policy, facts, at), table, at)


def _render_isolation(peers: PermittedPeers, table: str, now: datetime) -> str:
    platform4, platform6 = split_networks(peers.platform)
    resolvers4, resolvers6 = split_families(peers.resolvers)
    allow = {s.name: s for s in _allow_sets(peers.entries, now)}
    # A v1 policy (no protocol or port limits) renders exactly as it always did: the v2 sets
    # and their rules appear only when they hold something.
    extra = [s for n, s in allow.items() if n not in ("allowlist4", "allowlist6") and s.elements]
    any_v6 = bool(
        platform6
        or resolvers6
        or any(el.network.version == 6 for s in allow.values() for el in s.elements)
    )
    inbound_v2: list[str] = []
    outbound_v2: list[str] = []
    for s in extra:
        ip = "ip" if s.name.startswith("allowlist4") else "ip6"
        protocol = "tcp" if "_tcp" in s.name else "udp"
        reply = "\t\tct state established,related ct direction reply"
        if s.name.endswith("_ports"):
            inbound_v2.append(
                f"{reply} meta l4proto {protocol} ct original {ip} daddr"
                f" . ct original proto-dst @{s.name} accept"
            )
            outbound_v2.append(
                f"\t\tct direction original {ip} daddr . {protocol} dport @{s.name} accept"
            )
        else:
            inbound_v2.append(
                f"{reply} ct original protocol {protocol} ct original {ip} daddr @{s.name} accept"
            )
            outbound_v2.append(
                f"\t\tct direction original meta l4proto {protocol} {ip} daddr @{s.name} accept"
            )

    lines = [
        # Replacing the table in one transaction: either the new table is in force or the
        # previous one still is; `flush table` would keep stale set elements.
        f"add table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        *_set("platform4", "ipv4_addr", platform4),
        *_set("platform6", "ipv6_addr", platform6),
        *_render_allow_set(allow["allowlist4"], now),
        *_render_allow_set(allow["allowlist6"], now),
        *(line for s in extra for line in _render_allow_set(s, now)),
        *_set("resolvers4", "ipv4_addr", resolvers4),
        *_set("resolvers6", "ipv6_addr", resolvers6),
        "",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        '\t\tiif "lo" accept',
        # Only replies of flows the host itself opened to a permitted peer: an inbound session
        # opened before isolation (its packets are in the original direction) is cut, and a new
        # inbound connection is dropped even from a permitted address.
        "\t\tct state established,related ct direction reply ct original ip daddr @platform4 accept",
        "\t\tct state established,related ct direction reply ct original ip6 daddr @platform6 accept",
        "\t\tct state established,related ct direction reply ct original ip daddr @allowlist4 accept",
        "\t\tct state established,related ct direction reply ct original ip6 daddr @allowlist6 accept",
        *inbound_v2,
        "\t\tct state established,related ct direction reply ct original ip daddr @resolvers4"
        " meta l4proto { tcp, udp } th sport 53 accept",
        "\t\tct state established,related ct direction reply ct original ip6 daddr @resolvers6"
        " meta l4proto { tcp, udp } th sport 53 accept",
        # DHCP replies are often broadcast and not matched by conntrack.
        "\t\tudp sport 67 udp dport 68 accept",
        "\t\tudp sport 547 udp dport 546 accept",
    ]
    if any_v6:
        lines.append(
            "\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }"
            " ip6 hoplimit 255 accept"
        )
    lines += [
        "\t}",
        "",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy drop;",
        '\t\toif "lo" accept',
        # A TCP flow conntrack did not see start (opened before conntrack was active in this
        # namespace) is picked up mid-stream with the direction of its first packet seen: were
        # that a packet the host sends on an inbound session from a permitted address, the
        # session would pass as "opened by the host". Only a SYN may start a tracked TCP flow.
        "\t\tct state new tcp flags & (fin | syn | rst | ack) != syn drop",
        # The host's own flows only (original direction): replies to an inbound session opened
        # before isolation are dropped here too.
        "\t\tct direction original ip daddr @platform4 accept",
        "\t\tct direction original ip6 daddr @platform6 accept",
        "\t\tct direction original ip daddr @allowlist4 accept",
        "\t\tct direction original ip6 daddr @allowlist6 accept",
        *outbound_v2,
        "\t\tct direction original ip daddr @resolvers4 meta l4proto { tcp, udp } th dport 53 accept",
        "\t\tct direction original ip6 daddr @resolvers6 meta l4proto { tcp, udp } th dport 53 accept",
        "\t\tudp sport 68 udp dport 67 accept",
        "\t\tudp sport 546 udp dport 547 accept",
    ]
    if any_v6:
        lines.append(
            "\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }"
            " ip6 hoplimit 255 accept"
        )
    lines += [
        "\t}",
        "",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def is_permitted(
    policy: FrozenPolicy,
    facts: HostFacts,
    address: str,
    *,
    protocol: str | None = None,
    port: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Whether the rendered ruleset lets the host open ``protocol``/``port`` to ``address``
    (None: some protocol, some port); expired entries permit nothing."""
    if policy.mode == "none":
        return True
    peers = permitted_peers(policy, facts, now)
    return peers.permits(ipaddress.ip_address(address), protocol, port)


# --- usage counters ---------------------------------------------------------------------


@dataclass(frozen=True)
class CounterEntry:
    """The allowed entry a named counter counts, as the policy names it."""

    name: str
    address: str
    protocol: str
    ports: tuple[int, ...]


def usage_table(table: str) -> str:
    return f"{check_table_name(table)}_usage"


def usage_counters(policy: FrozenPolicy, now: datetime | None = None) -> list[CounterEntry]:
    """One named counter per live allowed entry of a standard policy (``e0``, ``e1``, …)."""
    if policy.mode != "standard":
        return []
    at = now if now is not None else datetime.now(UTC)
    return [
        CounterEntry(
            f"e{i}",
            peer.address,
            peer.protocol,
            tuple(sorted(peer.ports)) if peer.protocol != "any" else (),
        )
        for i, peer in enumerate(policy.allowed_outbound)
        if peer.expires_at is None or peer.expires_at > at
    ]


def render_usage(policy: FrozenPolicy, table: str, *, now: datetime | None = None) -> str:
    """A counting table beside the enforcing one: one named counter per allowed entry.

    Its chains hook output and input at a priority *after* the enforcing table's (filter + 10)
    and only count, with policy accept: a packet the enforcing table dropped never gets here
    (a drop is final), and an accept here loosens nothing. So the counts are exactly what the
    allowlist let through, and the enforcing table's text and ``rules_sha256`` stay what they
    were. Replacing this table (every apply) resets the counters.
    """
    name = usage_table(table)
    lines = [f"add table inet {name}", f"delete table inet {name}", f"table inet {name} {{"]
    out: list[str] = []
    into: list[str] = []
    for c in usage_counters(policy, now):
        lines.append(f'\tcounter {c.name} {{ comment "{c.protocol} {c.address}" }}')
        network = ipaddress.ip_network(c.address, strict=False)
        ip = "ip" if network.version == 4 else "ip6"
        address = _element(network)
        if c.protocol == "any":
            out.append(f'\t\tct direction original {ip} daddr {address} counter name "{c.name}"')
            into.append(
                f'\t\tct direction reply ct original {ip} daddr {address} counter name "{c.name}"'
            )
            continue
        ports = "{ " + ", ".join(str(p) for p in c.ports) + " }"
        out_ports = f" th dport {ports}" if c.ports else ""
        in_ports = f" ct original proto-dst {ports}" if c.ports else ""
        out.append(
            f"\t\tct direction original meta l4proto {c.protocol} {ip} daddr {address}"
            f'{out_ports} counter name "{c.name}"'
        )
        # As the enforcing table's reply rules: proto-dst needs the protocol from meta l4proto.
        match = f"meta l4proto {c.protocol}" if c.ports else f"ct original protocol {c.protocol}"
        into.append(
            f"\t\tct direction reply {match}"
            f' ct original {ip} daddr {address}{in_ports} counter name "{c.name}"'
        )
    lines += [
        "\tchain output {",
        "\t\ttype filter hook output priority filter + 10; policy accept;",
        *out,
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter + 10; policy accept;",
        *into,
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def parse_counters(listing: str) -> dict[str, tuple[int, int]]:
    """``nft -j list counters table inet T`` → {name: (packets, bytes)}; raises ValueError."""
    doc = json.loads(listing)
    counters: dict[str, tuple[int, int]] = {}
    for item in doc.get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(counter, dict):
            continue
        name, packets, size = counter.get("name"), counter.get("packets"), counter.get("bytes")
        if not isinstance(name, str) or not isinstance(packets, int) or not isinstance(size, int):
            raise ValueError(f"unreadable counter {counter!r}")
        counters[name] = (packets, size)
    return counters
