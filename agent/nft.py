"""Pure nftables renderer: a frozen policy and the host's facts become one atomic ``nft -f`` file."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable

from agent.addresses import (
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
    if any(
        isinstance(p, ipaddress.IPv4Network | ipaddress.IPv6Network)
        and p.prefixlen < p.max_prefixlen
        for p in items
    ):
        # Prefixes need an interval set; the peers were collapsed, so no two intervals overlap.
        lines.append("\t\tflags interval")
    elements = ", ".join(_element(p) for p in items)
    if elements:
        lines.append(f"\t\telements = {{ {elements} }}")
    lines.append("\t}")
    return lines


def render_release(table: str) -> str:
    """Release: delete our table; ``add`` first so the transaction succeeds when it is absent."""
    check_table_name(table)
    return f"add table inet {table}\ndelete table inet {table}\n"


def render_ruleset(policy: FrozenPolicy, facts: HostFacts, table: str = "hostiso") -> str:
    """The whole table for an isolation policy, or the release for ``mode: none``."""
    if policy.mode == "none":
        return render_release(table)
    check_table_name(table)
    return _render_isolation(permitted_peers(policy, facts), table)


def _render_isolation(peers: PermittedPeers, table: str) -> str:
    platform4, platform6 = split_networks(peers.platform)
    allowlist4, allowlist6 = split_networks(peers.allowlist)
    resolvers4, resolvers6 = split_families(peers.resolvers)
    any_v6 = bool(platform6 or allowlist6 or resolvers6)

    lines = [
        # Replacing the table in one transaction: either the new table is in force or the
        # previous one still is; `flush table` would keep stale set elements.
        f"add table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        *_set("platform4", "ipv4_addr", platform4),
        *_set("platform6", "ipv6_addr", platform6),
        *_set("allowlist4", "ipv4_addr", allowlist4),
        *_set("allowlist6", "ipv6_addr", allowlist6),
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


def is_permitted(policy: FrozenPolicy, facts: HostFacts, address: str) -> bool:
    """Whether ``address`` is one the rendered ruleset lets the host connect to."""
    if policy.mode == "none":
        return True
    return permitted_peers(policy, facts).permits(ipaddress.ip_address(address))
