"""Host firewall backends: nftables (real, with positive/negative checks and rollback) and simulated."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from agent.addresses import HostFacts, InvalidAddressError
from agent.nft import (
    CounterEntry,
    is_permitted,
    parse_counters,
    render_release,
    render_ruleset,
    render_usage,
    retime,
    rules_sha256,
    usage_counters,
    usage_table,
)
from shared.messages import FrozenPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """A TCP endpoint the agent connects to for its positive or negative check."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> Probe:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"probe {value!r}: expected HOST:PORT")
        return cls(host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ApplyOutcome:
    """What applying a policy did: the status to report, and whether its rules are in force."""

    status: Literal["applied", "failed"]
    rules_sha256: str | None
    detail: str
    rules_in_force: bool
    ruleset: str | None = None


class HostFirewall(Protocol):
    """Applies a verified policy to the host."""

    async def apply(self, policy: FrozenPolicy, *, rollback_on_failure: bool) -> ApplyOutcome: ...

    async def table_present(self) -> bool: ...

    def restore_known(self, ruleset: str | None) -> None: ...


async def tcp_reachable(probe: Probe, timeout: float) -> tuple[bool, str]:
    """Connect and close; a dropped SYN just times out, hence the bound."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(probe.host, probe.port), timeout)
    except TimeoutError:
        return False, f"{probe}: no answer within {timeout:g}s"
    except OSError as exc:
        return False, f"{probe}: {exc.strerror or exc!r}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError as exc:
        log.debug("closing probe connection to %s: %r", probe, exc)
    return True, f"{probe}: connected"


# What a ruleset's text depends on besides the host facts and the table name: the mode and, per
# peer, what is rendered of it (its display name is not). Policy, endpoint and account ids and
# the sequence never reach the text.
_RenderKey = tuple[
    str, tuple[tuple[str, str, tuple[int, ...]], ...], tuple[str, ...], HostFacts, str
]


class RenderCache:
    """Rendered rulesets and their hashes by what they are rendered from, at most ``size``.

    For simulated agents only: every agent of a simulated process belongs to one account and
    is sent the same allowlist, so thousands of them would render the same table thousands of
    times. The text is still the one ``render_ruleset`` (the real agent's renderer) returns: a
    miss renders it, and a render that raises (a host fact nft cannot name) is never stored,
    so it is refused every time. Policies with an expiring entry are rendered every time:
    their text holds the seconds left, which depend on the apply time.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._rendered: dict[_RenderKey, tuple[str, str]] = {}

    def render(self, policy: FrozenPolicy, facts: HostFacts, table: str) -> tuple[str, str]:
        """``(ruleset, rules_sha256)`` of ``policy``; raises as ``render_ruleset`` does."""
        peers = policy.allowed_outbound
        if any(peer.expires_at is not None for peer in peers):
            ruleset = render_ruleset(policy, facts, table)
            return ruleset, rules_sha256(ruleset)
        key: _RenderKey = (
            policy.mode,
            tuple((peer.address, peer.protocol, peer.ports) for peer in peers),
            policy.platform,
            facts,
            table,
        )
        known = self._rendered.get(key)
        if known is None:
            ruleset = render_ruleset(policy, facts, table)
            known = (ruleset, rules_sha256(ruleset))
            if len(self._rendered) >= self.size:
                del self._rendered[next(iter(self._rendered))]  # the oldest
            self._rendered[key] = known
        return known


# Shared by the simulated agents of a process (each has its own SimulatedFirewall).
SIMULATED_RENDERS = RenderCache()


class SimulatedFirewall:
    """Renders (so bad addresses are still refused) and hashes, but touches nothing on the host."""

    def __init__(self, facts: HostFacts, table: str, *, renders: RenderCache | None = None) -> None:
        self.facts = facts
        self.table = table
        self.renders = SIMULATED_RENDERS if renders is None else renders

    async def apply(self, policy: FrozenPolicy, *, rollback_on_failure: bool) -> ApplyOutcome:
        try:
            ruleset, digest = self.renders.render(policy, self.facts, self.table)
        except InvalidAddressError as exc:
            return ApplyOutcome("failed", None, f"refused to render: {exc}", rules_in_force=False)
        return ApplyOutcome("applied", digest, "simulated", rules_in_force=True, ruleset=ruleset)

    async def table_present(self) -> bool:
        return True

    def restore_known(self, ruleset: str | None) -> None:
        return None


@dataclass(frozen=True)
class UsageReading:
    """The counters of the policy in force: which sequence, which counting table generation
    (a new one each time the table is loaded, which resets the kernel's counts), and the
    kernel's totals per counter name."""

    sequence: int
    generation: int
    entries: tuple[CounterEntry, ...]
    totals: dict[str, tuple[int, int]]


@runtime_checkable
class UsageSource(Protocol):
    """A firewall that counts the allowlist's traffic (the nftables one)."""

    async def read_usage(self) -> UsageReading | None: ...


class NftablesError(Exception):
    """``nft`` refused a ruleset or could not run."""


class NftablesFirewall:
    """Applies the rendered table with one ``nft -f`` transaction, checks it, rolls back if needed."""

    def __init__(
        self,
        facts: HostFacts,
        table: str,
        *,
        platform_probe: Probe | None,
        negative_probe: Probe | None,
        nft_command: Sequence[str] = ("nft",),
        positive_timeout: float = 3.0,
        negative_timeout: float = 1.0,
    ) -> None:
        self.facts = facts
        self.table = table
        self.platform_probe = platform_probe
        self.negative_probe = negative_probe
        self.nft_command = tuple(nft_command)
        self.positive_timeout = positive_timeout
        self.negative_timeout = negative_timeout
        # The ruleset we last put in force; rollback goes back to it (or releases if none).
        self.current_ruleset: str | None = None
        # The counting table beside it (render_usage): what it counts, and its generation.
        self._usage: tuple[int, tuple[CounterEntry, ...]] | None = None
        self._usage_generation = 0

    def restore_known(self, ruleset: str | None) -> None:
        self.current_ruleset = ruleset

    async def _nft(self, *args: str, stdin: str | None = None) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.nft_command,
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NftablesError(f"cannot run {self.nft_command[0]}: {exc.strerror}") from exc
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            raise NftablesError(err.decode(errors="replace").strip()[:1000] or "nft failed")
        return out.decode(errors="replace")

    async def load(self, ruleset: str) -> None:
        await self._nft("-f", "-", stdin=ruleset)

    async def table_present(self) -> bool:
        try:
            await self._nft("list", "table", "inet", self.table)
        except NftablesError:
            return False
        return True

    async def _rollback(self) -> str:
        # The stored text's element timeouts were computed when it was first applied: recompute
        # them (and leave out what expired since), so a rollback never re-opens an entry.
        previous = retime(self.current_ruleset) if self.current_ruleset else None
        try:
            await self.load(previous or render_release(self.table))
        except NftablesError as exc:
            return f"rollback failed too: {exc}"
        return "rolled back to the previous ruleset" if self.current_ruleset else "rolled back"

    async def apply(self, policy: FrozenPolicy, *, rollback_on_failure: bool) -> ApplyOutcome:
        outcome = await self._apply(policy, rollback_on_failure=rollback_on_failure)
        if outcome.rules_in_force:
            await self._count(policy)
        return outcome

    async def _count(self, policy: FrozenPolicy) -> None:
        """Put the counting table in place for the policy now in force (or remove it).

        Best effort: it holds no verdict that matters, so a failure is logged and the
        enforcing rules stay exactly as they are (fail closed)."""
        self._usage = None
        try:
            if policy.mode != "standard":
                await self.load(render_release(usage_table(self.table)))
                return
            entries = tuple(usage_counters(policy))
            await self.load(render_usage(policy, self.table))
        except NftablesError as exc:
            log.warning("usage counters not loaded, rules in force kept: %s", exc)
            return
        self._usage_generation += 1
        self._usage = (policy.sequence, entries)

    async def read_usage(self) -> UsageReading | None:
        """The counters of the policy in force; None when nothing is counted."""
        if self._usage is None:
            return None
        sequence, entries = self._usage
        generation = self._usage_generation
        listing = await self._nft(
            "-j", "list", "counters", "table", "inet", usage_table(self.table)
        )
        try:
            totals = parse_counters(listing)
        except ValueError as exc:
            raise NftablesError(f"unreadable counters: {exc}") from exc
        return UsageReading(sequence, generation, entries, totals)

    async def _apply(self, policy: FrozenPolicy, *, rollback_on_failure: bool) -> ApplyOutcome:
        try:
            ruleset = render_ruleset(policy, self.facts, self.table)
        except InvalidAddressError as exc:
            return ApplyOutcome("failed", None, f"refused to render: {exc}", rules_in_force=False)
        digest = rules_sha256(ruleset)
        try:
            await self.load(ruleset)
        except NftablesError as exc:
            # A failing `nft -f` transaction leaves the previous ruleset untouched.
            return ApplyOutcome("failed", digest, f"nft -f failed: {exc}", rules_in_force=False)
        if policy.mode == "none":
            self.current_ruleset = None
            return ApplyOutcome("applied", digest, "table deleted", True, ruleset)
        if self.platform_probe is not None:
            ok, detail = await tcp_reachable(self.platform_probe, self.positive_timeout)
            if not ok and rollback_on_failure:
                rolled = await self._rollback()
                return ApplyOutcome(
                    "failed", digest, f"positive check failed: platform {detail}; {rolled}", False
                )
            if not ok:
                log.warning("positive check failed, rules kept: platform %s", detail)
        self.current_ruleset = ruleset
        if not await self.table_present():
            return ApplyOutcome("failed", digest, "negative check failed: table not loaded", False)
        probe = self.negative_probe
        if probe is not None and not _probe_permitted(policy, self.facts, probe):
            reachable, detail = await tcp_reachable(probe, self.negative_timeout)
            if reachable:
                # Rolling back would only loosen the host further: keep the tighter rules.
                return ApplyOutcome(
                    "failed", digest, f"negative check failed: {detail}; rules kept", True, ruleset
                )
        return ApplyOutcome("applied", digest, "nftables table in force", True, ruleset)


def _probe_permitted(policy: FrozenPolicy, facts: HostFacts, probe: Probe) -> bool:
    try:
        # The probe is a TCP connect: a peer open only to UDP, or to other ports, does not count.
        return is_permitted(policy, facts, probe.host, protocol="tcp", port=probe.port)
    except ValueError:
        return True  # a hostname: cannot say it is non-permitted, so no negative claim
