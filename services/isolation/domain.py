"""Pure isolation rules: snapshot, precedence, sequence and the delivery state machine (no I/O)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.messages import (
    Actor,
    AllowedPeer,
    AllowlistChanged,
    AllowlistEntry,
    EnforcePolicy,
    FrozenPolicy,
    IsolationMode,
    IsolationState,
    IsolationStateChanged,
    PolicyMode,
    PolicyStatusReported,
    peer_key,
)

Lane = Literal["normal", "priority"]

# States in which the endpoint is (meant to be) cut off: an account-wide strict covers them.
_ISOLATING_STATES: frozenset[IsolationState] = frozenset({"isolation_pending", "isolated"})


class EndpointRecord(BaseModel):
    """An enrolled endpoint, as the registry replica knows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_id: str
    account_id: str
    hostname: str
    platform: str


class EndpointIsolation(BaseModel):
    """The isolation state of one endpoint and the policy in force or pending."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_id: str
    account_id: str
    state: IsolationState = "not_isolated"
    mode: PolicyMode | None = None
    policy: FrozenPolicy | None = None
    desired_sequence: int = 0
    applied_sequence: int = 0
    rules_sha256: str | None = None
    detail: str = ""
    updated_at: datetime | None = None
    request_ids: tuple[str, ...] = Field(
        (), description="The request(s) that issued the policy in force or pending."
    )

    @property
    def isolated_or_pending(self) -> bool:
        """Isolated, pending, or an isolation that failed to apply (still meant to isolate)."""
        if self.state in _ISOLATING_STATES:
            return True
        return self.state == "failed" and self.mode in ("standard", "strict")

    @property
    def strict(self) -> bool:
        return self.mode == "strict" and self.isolated_or_pending


class RequestOutcome(BaseModel):
    """What a request did to one endpoint; kept so a redelivery repeats it instead of redoing it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["policy", "noop"]
    endpoint_id: str
    account_id: str
    detail: str = ""
    lane: Lane | None = None
    command: EnforcePolicy | None = None
    sent: bool = Field(False, description="The command is acknowledged by Kafka.")


def fresh_isolation(endpoint: EndpointRecord) -> EndpointIsolation:
    """The state of an endpoint that has never been isolated."""
    return EndpointIsolation(endpoint_id=endpoint.endpoint_id, account_id=endpoint.account_id)


@dataclass(frozen=True)
class PolicyIssued:
    """The request yields a new policy: store ``isolation`` and send ``policy`` on ``lane``."""

    isolation: EndpointIsolation
    policy: FrozenPolicy
    # A revoke tightens a standard policy: it overtakes any backlog like a strict one does.
    priority: bool = False
    detail: str = ""

    @property
    def lane(self) -> Lane:
        return "priority" if self.priority else lane_for(self.policy)


@dataclass(frozen=True)
class NothingToDo:
    """The request changes nothing (already in that state; strict is never downgraded)."""

    reason: str


@dataclass(frozen=True)
class RequestDenied:
    """The caller may not do this (another account, or a partner loosening strict)."""

    reason: str
    kind: Literal["tenancy", "strict"] = "strict"


Decision = PolicyIssued | NothingToDo | RequestDenied


class TenancyViolationError(ValueError):
    """Settings of one account were offered for another account's snapshot."""


def may_override_strict(actor: Actor) -> bool:
    """Only the SOC (and platform services acting for it) may release or loosen strict."""
    return actor.role in ("soc", "service")


def may_touch_account(actor: Actor, account_id: str) -> bool:
    return actor.role in ("soc", "service") or actor.account_id == account_id


def lane_for(policy: FrozenPolicy) -> Lane:
    """Strict policies overtake any backlog: they travel on the priority lane."""
    return "priority" if policy.mode == "strict" else "normal"


def next_sequence(current: EndpointIsolation) -> int:
    return current.desired_sequence + 1


def snapshot_allowlist(
    account_id: str, settings: AllowlistChanged | None, *, now: datetime | None = None
) -> tuple[tuple[AllowedPeer, ...], int]:
    """The account's allowlist as it is now (empty if off or unknown) and its settings version.

    Entries past their ``expires_at`` at ``now`` (default: the current time) are left out
    (DESIGN §5); the others keep their ports, protocol and expiry, which the agent enforces.
    """
    if settings is None:
        return (), 0
    if settings.account_id != account_id:
        # Guarantee 8: a policy only ever holds its own account's entries.
        raise TenancyViolationError(
            f"settings of account {settings.account_id} offered for account {account_id}"
        )
    if not settings.enabled:
        return (), settings.version
    at = now if now is not None else datetime.now(UTC)
    peers = tuple(
        peer_of_entry(e) for e in settings.entries if e.expires_at is None or e.expires_at > at
    )
    return peers, settings.version


def snapshot_version(account_id: str, settings: AllowlistChanged | None) -> int:
    """The settings version a policy without an allowlist (strict, release) records."""
    if settings is None:
        return 0
    if settings.account_id != account_id:
        raise TenancyViolationError(
            f"settings of account {settings.account_id} offered for account {account_id}"
        )
    return settings.version


@dataclass(frozen=True)
class PolicyContext:
    """What a new policy needs besides the state: identity, time, author, platform addresses."""

    policy_id: str
    now: datetime
    actor: Actor
    reason: str
    platform: tuple[str, ...]


def _issue(
    current: EndpointIsolation,
    mode: PolicyMode,
    ctx: PolicyContext,
    settings: AllowlistChanged | None,
) -> PolicyIssued:
    if mode == "standard":
        peers, version = snapshot_allowlist(current.account_id, settings, now=ctx.now)
    else:
        # Strict and release carry no allowlist; the version still records what was known.
        version = snapshot_version(current.account_id, settings)
        peers = ()
    policy = FrozenPolicy(
        policy_id=ctx.policy_id,
        endpoint_id=current.endpoint_id,
        account_id=current.account_id,
        sequence=next_sequence(current),
        mode=mode,
        allowed_outbound=peers,
        platform=ctx.platform,
        settings_version=version,
        issued_at=ctx.now,
        issued_by=ctx.actor.sub,
        reason=ctx.reason,
    )
    state: IsolationState = "release_pending" if mode == "none" else "isolation_pending"
    isolation = current.model_copy(
        update={
            "state": state,
            "mode": mode,
            "policy": policy,
            "desired_sequence": policy.sequence,
            "rules_sha256": None,
            "detail": "",
            "updated_at": ctx.now,
        }
    )
    return PolicyIssued(isolation=isolation, policy=policy)


def decide_isolation(
    current: EndpointIsolation,
    mode: IsolationMode,
    ctx: PolicyContext,
    settings: AllowlistChanged | None,
) -> Decision:
    """Isolate standard (freeze the allowlist now) or strict, honouring strict precedence."""
    if not may_touch_account(ctx.actor, current.account_id):
        return RequestDenied(
            f"endpoint {current.endpoint_id} belongs to another account", kind="tenancy"
        )
    if current.isolated_or_pending:
        if current.mode == mode and current.state != "failed":
            # Guarantee 3: repeating an isolate keeps the frozen snapshot.
            return NothingToDo(f"endpoint is already {current.state} ({mode})")
        if current.mode == "strict" and mode == "standard":
            if not may_override_strict(ctx.actor):
                return RequestDenied(
                    "only the SOC may loosen a strict isolation; a partner cannot request "
                    "standard isolation of a strictly isolated endpoint"
                )
            # Guarantee 4: a standard request never downgrades strict, even from the SOC.
            if current.state != "failed":
                return NothingToDo("strict isolation is kept; release first to loosen it")
            return _issue(current, "strict", ctx, settings)
    return _issue(current, mode, ctx, settings)


def decide_release(
    current: EndpointIsolation, ctx: PolicyContext, settings: AllowlistChanged | None
) -> Decision:
    """Release (policy mode ``none``); only the SOC releases a strict isolation."""
    if not may_touch_account(ctx.actor, current.account_id):
        return RequestDenied(
            f"endpoint {current.endpoint_id} belongs to another account", kind="tenancy"
        )
    if current.state == "not_isolated" or current.state == "release_pending":
        return NothingToDo(f"endpoint is {current.state}")
    if current.strict and not may_override_strict(ctx.actor):
        return RequestDenied("only the SOC may release a strict isolation")
    return _issue(current, "none", ctx, settings)


class StatusIgnored(ValueError):
    """A status report that does not concern the current sequence (stale or duplicate)."""


def apply_status(current: EndpointIsolation, report: PolicyStatusReported) -> EndpointIsolation:
    """Guarantee 7: only the agent's report on the CURRENT sequence moves the state."""
    if current.policy is None or report.sequence != current.desired_sequence:
        raise StatusIgnored(
            f"status for sequence {report.sequence}, current is {current.desired_sequence}"
        )
    if report.policy_id != current.policy.policy_id:
        raise StatusIgnored(f"status for policy {report.policy_id}, current differs")
    if report.status == "applied":
        state: IsolationState = "not_isolated" if current.mode == "none" else "isolated"
        if (
            current.state == state
            and current.applied_sequence == report.sequence
            and current.rules_sha256 == report.rules_sha256
        ):
            raise StatusIgnored("duplicate applied report")
        return current.model_copy(
            update={
                "state": state,
                "applied_sequence": report.sequence,
                "rules_sha256": report.rules_sha256,
                "detail": report.detail,
                "updated_at": report.occurred_at,
            }
        )
    if current.state == "failed" and current.detail == report.detail:
        raise StatusIgnored("duplicate failed report")
    return current.model_copy(
        update={"state": "failed", "detail": report.detail, "updated_at": report.occurred_at}
    )


def state_changed(isolation: EndpointIsolation) -> IsolationStateChanged:
    """The ``isolation.events.v1`` event that tells other services where ``isolation`` stands."""
    policy = isolation.policy
    return IsolationStateChanged(
        endpoint_id=isolation.endpoint_id,
        account_id=isolation.account_id,
        state=isolation.state,
        mode=isolation.mode,
        sequence=isolation.desired_sequence,
        policy_id=policy.policy_id if policy else None,
        request_ids=isolation.request_ids,
        settings_version=policy.settings_version if policy and policy.mode == "standard" else None,
        rules_sha256=isolation.rules_sha256,
        detail=isolation.detail,
    )


def pending_state_of(command: EnforcePolicy, request_key: str) -> IsolationStateChanged:
    """The event of a just-issued policy (its state is pending until the agent reports)."""
    policy = command.policy
    return IsolationStateChanged(
        endpoint_id=policy.endpoint_id,
        account_id=policy.account_id,
        state="release_pending" if policy.mode == "none" else "isolation_pending",
        mode=policy.mode,
        sequence=policy.sequence,
        policy_id=policy.policy_id,
        request_ids=(request_key,),
        settings_version=policy.settings_version if policy.mode == "standard" else None,
    )


# --- revoke, refresh and preview (DESIGN §4, guarantee 14) ------------------------------


@functools.lru_cache(maxsize=4096)
def peer_of_entry(entry: AllowlistEntry) -> AllowedPeer:
    """The peer a snapshot makes of ``entry``.

    Remembered per entry (both are frozen, so equal entries make equal peers): checking a peer's
    address again for every snapshot of an account was most of the CPU of an isolation.
    """
    return AllowedPeer(
        name=entry.name,
        address=entry.address,
        ports=entry.ports,
        protocol=entry.protocol,
        expires_at=entry.expires_at,
    )


def _key_of(peer: AllowedPeer) -> tuple[str, tuple[int, ...], str]:
    return peer_key(peer.address, peer.ports, peer.protocol)


def same_peer(frozen: AllowedPeer, target: AllowedPeer) -> bool:
    """``frozen`` opens what ``target`` opens: same address, ports and protocol (``peer_key``).

    Its name (a later rename) and its expiry do not matter: a revoked tool is cut either way.
    """
    return _key_of(frozen) == _key_of(target)


def allows_peer(isolation: EndpointIsolation, target: AllowedPeer) -> bool:
    """The policy in force or pending lets the endpoint reach ``target``."""
    policy = isolation.policy
    if policy is None or not isolation.isolated_or_pending or policy.mode != "standard":
        return False
    return any(same_peer(p, target) for p in policy.allowed_outbound)


@dataclass(frozen=True)
class Revocation:
    """An entry revoked at a settings version: what every isolated endpoint must lose."""

    revocation_id: str
    account_id: str
    entry: AllowlistEntry
    settings_version: int
    reason: str
    requested_by: Actor

    @property
    def peer(self) -> AllowedPeer:
        return peer_of_entry(self.entry)

    def request_key(self, endpoint_id: str) -> str:
        """The derived request id: a redelivered fan-out re-sends ids the endpoint already ran."""
        return f"{self.revocation_id}:{endpoint_id}"

    def outdates(self, policy: FrozenPolicy) -> bool:
        """``policy`` was snapshotted before this revocation and still allows its peer."""
        return (
            policy.account_id == self.account_id
            and policy.mode == "standard"
            and policy.settings_version < self.settings_version
            and any(same_peer(p, self.peer) for p in policy.allowed_outbound)
        )


def decide_revoke(
    current: EndpointIsolation, revocation: Revocation, ctx: PolicyContext
) -> Decision:
    """Cut the revoked peer from the policy in force or pending: same mode, next sequence.

    Guarantee 14: only ever removes access. A policy without the peer (strict, released, or
    already tightened) is untouched, and an endpoint of another account is never touched.
    """
    if current.account_id != revocation.account_id or not may_touch_account(
        ctx.actor, current.account_id
    ):
        return RequestDenied(
            f"endpoint {current.endpoint_id} belongs to another account", kind="tenancy"
        )
    target = revocation.peer
    policy = current.policy
    if policy is None or not allows_peer(current, target):
        return NothingToDo(f"the policy in force does not allow {target.address}")
    if policy.settings_version >= revocation.settings_version:
        # Snapshotted at or after the revocation: a peer it holds was added back since (a
        # redelivered or replayed revocation must not cut the entry that replaced it).
        return NothingToDo(
            f"the policy's snapshot (settings v{policy.settings_version}) is newer than the "
            f"revocation (v{revocation.settings_version})"
        )
    kept = tuple(p for p in policy.allowed_outbound if not same_peer(p, target))
    tightened = policy.model_copy(
        update={
            "policy_id": ctx.policy_id,
            "sequence": next_sequence(current),
            "allowed_outbound": kept,
            "issued_at": ctx.now,
            "issued_by": ctx.actor.sub,
            "reason": ctx.reason,
        }
    )
    isolation = current.model_copy(
        update={
            "state": "isolation_pending",
            "policy": tightened,
            "desired_sequence": tightened.sequence,
            "rules_sha256": None,
            "detail": "",
            "updated_at": ctx.now,
        }
    )
    return PolicyIssued(
        isolation=isolation,
        policy=tightened,
        priority=True,
        # The audit record of each endpoint says who (its actor) and why (the revocation's reason).
        detail=ctx.reason or f"revoked {revocation.entry.name!r} {target.address}",
    )


def refresh_refusal(current: EndpointIsolation) -> str | None:
    """Why ``current`` cannot be refreshed (only a standard isolation can), or None."""
    if current.strict:
        return "a strict isolation stays strict until the SOC releases it; refresh is for standard"
    if not current.isolated_or_pending or current.mode != "standard":
        return f"endpoint is {current.state}; only a standard isolation can be refreshed"
    return None


def decide_refresh(
    current: EndpointIsolation, ctx: PolicyContext, settings: AllowlistChanged | None
) -> Decision:
    """A standard isolation takes the account's current allowlist, without a release."""
    if not may_touch_account(ctx.actor, current.account_id):
        return RequestDenied(
            f"endpoint {current.endpoint_id} belongs to another account", kind="tenancy"
        )
    refusal = refresh_refusal(current)
    if refusal is not None:
        # Guarantee 14: never loosens strict; a release pending stays a release.
        return NothingToDo(refusal)
    peers, version = snapshot_allowlist(current.account_id, settings)
    policy = current.policy
    if policy is not None and policy.allowed_outbound == peers:
        return NothingToDo(f"the policy in force already holds the allowlist of version {version}")
    issued = _issue(current, "standard", ctx, settings)
    return PolicyIssued(
        isolation=issued.isolation,
        policy=issued.policy,
        detail=f"refreshed to settings version {version}"
        + (f": {ctx.reason}" if ctx.reason else ""),
    )


@dataclass(frozen=True)
class PolicyDiff:
    """Peers a new policy would add and remove, against the policy in force."""

    added: tuple[AllowedPeer, ...] = ()
    removed: tuple[AllowedPeer, ...] = ()


def policy_diff(in_force: FrozenPolicy | None, candidate: FrozenPolicy | None) -> PolicyDiff:
    """What ``candidate`` changes in ``in_force`` (both empty when either is missing)."""
    if in_force is None or candidate is None:
        return PolicyDiff()
    before = {_key_of(p) for p in in_force.allowed_outbound}
    after = {_key_of(p) for p in candidate.allowed_outbound}
    return PolicyDiff(
        added=tuple(p for p in candidate.allowed_outbound if _key_of(p) not in before),
        removed=tuple(p for p in in_force.allowed_outbound if _key_of(p) not in after),
    )
