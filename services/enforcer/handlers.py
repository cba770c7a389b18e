"""Enforcer use cases: enroll an agent, store commanded policies, deliver them, take status reports."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from services.enforcer.domain import (
    AccountAccessDeniedError,
    AgentIdentity,
    CreateOutcome,
    DesiredPolicyRef,
    EndpointLimitReachedError,
    EndpointOfAnotherAccountError,
    EnrollmentConflictError,
    EnrollmentKeyNotFoundError,
    EnrollmentKeyRecord,
    EnrollmentKeyRejectedError,
    EnrollmentRateLimitedError,
    HeldPolicy,
    Lane,
    PolicyNotHeldError,
    ReissueOutcome,
    StoreOutcome,
    UnknownAgentTokenError,
    check_enrollment_key,
    check_status_consistency,
    check_status_report,
    enrollment_key_digest,
    enrollment_key_id,
    new_agent_token,
    new_enrollment_key,
    newest_per_endpoint,
    token_digest,
)
from services.enforcer.signing import PolicySigner
from shared.enrollment import enrollment_key_matches
from shared.messages import (
    Actor,
    AllowlistUsage,
    AllowlistUsageReported,
    AuditRecorded,
    EndpointRegistered,
    EnforcePolicy,
    FrozenPolicy,
    PolicyStatusReported,
    utcnow,
)

log = logging.getLogger(__name__)

Platform = Literal["linux", "windows", "macos"]
DeliveryStatus = Literal["applied", "failed"]


@dataclass(frozen=True)
class AgentRecord:
    """What the enforcer keeps about an enrolled agent (never the token itself)."""

    agent_id: str
    account_id: str
    hostname: str
    platform: Platform
    token_sha256: str
    enrolled_at: str


@dataclass(frozen=True)
class Enrollment:
    """The answer to an enrollment: the endpoint id and the only copy of its token."""

    agent_id: str
    agent_token: str


@dataclass(frozen=True)
class PolicyToStore:
    """A policy and its signed JSON, ready for the compare-and-set."""

    policy: FrozenPolicy
    signed_json: bytes


@dataclass
class LaneBatchResult:
    """What one batch of commands did to the desired state."""

    stored: int = 0
    stale: int = 0
    rejected: list[tuple[EnforcePolicy, str]] = field(default_factory=list)


@dataclass(frozen=True)
class IssuedEnrollmentKey:
    """A rotation's answer: the new key (its only copy) and the keys it revoked."""

    record: EnrollmentKeyRecord
    enrollment_key: str
    revoked_key_ids: list[str]


@dataclass(frozen=True)
class RateDecision:
    """One counted enrollment attempt: allowed or not, and when the window ends."""

    allowed: bool
    limit: int
    retry_after_s: int


class AgentStore(Protocol):
    async def create(self, record: AgentRecord) -> CreateOutcome:
        """Store a new agent unless its id is taken or its account is at the endpoint cap."""
        ...

    async def reissue_token(
        self, agent_id: str, account_id: str, token_sha256: str, reenrolled_at: str
    ) -> ReissueOutcome: ...

    async def delete(self, record: AgentRecord) -> None: ...

    async def identity(self, agent_id: str, token_sha256: str) -> AgentIdentity | None:
        """The agent ``agent_id`` if ``token_sha256`` is its token's digest, else None."""
        ...


@dataclass(frozen=True)
class PollResult:
    """What one poll found: the agent its token opens (None: it opens none), a newer policy."""

    identity: AgentIdentity | None
    newer: HeldPolicy | None


class PolicyStore(Protocol):
    async def store_if_newer(
        self, items: Sequence[PolicyToStore], lane: Lane
    ) -> list[StoreOutcome]: ...

    async def held(self, endpoint_id: str) -> HeldPolicy | None: ...

    async def poll(self, endpoint_id: str, token_sha256: str, after: int) -> PollResult:
        """Check the agent's token and its cursor, and read the policy only if it is newer."""
        ...

    async def record_delivery(
        self, endpoint_id: str, sequence: int, policy_id: str, status: str
    ) -> DesiredPolicyRef | None:
        """Mark the delivery state if ``sequence`` and ``policy_id`` are the desired policy's;
        either way answer the desired sequence and policy id (None: the endpoint has none)."""
        ...


class EnrollmentKeyStore(Protocol):
    async def get(self, account_id: str, key_id: str) -> EnrollmentKeyRecord | None: ...

    async def for_account(self, account_id: str) -> list[EnrollmentKeyRecord]: ...

    async def any_issued(self, account_id: str) -> bool: ...

    async def rotate(self, record: EnrollmentKeyRecord) -> list[str]:
        """Add ``record`` and revoke every other active key of its account, atomically."""
        ...

    async def revoke(
        self, account_id: str, key_id: str, revoked_at: str
    ) -> EnrollmentKeyRecord | None: ...


class EnrollmentRateLimiter(Protocol):
    async def hit(self, account_id: str) -> RateDecision: ...


class EventPublisher(Protocol):
    async def endpoint_registered(self, message: EndpointRegistered) -> None: ...

    async def audit_recorded(self, message: AuditRecorded) -> None: ...

    async def policy_status_reported(self, message: PolicyStatusReported) -> None: ...

    async def allowlist_usage_reported(self, message: AllowlistUsageReported) -> None: ...


class PolicyWaiter(Protocol):
    def arm(self) -> None: ...

    async def wait(self, timeout: float) -> bool: ...


class PolicyWakeups(Protocol):
    def waiter(self, endpoint_id: str) -> AbstractContextManager[PolicyWaiter]: ...

    @property
    def draining(self) -> bool:
        """The process is shutting down: a poll answers what it finds now instead of waiting."""
        ...


class SignerNotReadyError(RuntimeError):
    """The signing key has not been loaded yet (startup not finished)."""


@dataclass
class EnforcerDeps:
    """Everything the use cases depend on, as protocols."""

    agents: AgentStore
    policies: PolicyStore
    events: EventPublisher
    wakeups: PolicyWakeups
    enrollment_keys: EnrollmentKeyStore
    enrollment_rate: EnrollmentRateLimiter
    # Dev mode only: the secret of the derived (HMAC) dev enrollment key, accepted for an account
    # until its first rotation. None outside dev mode, where only issued keys open enrollment.
    dev_enrollment_secret: str | None = None
    signer_or_none: PolicySigner | None = None

    @property
    def signer(self) -> PolicySigner:
        if self.signer_or_none is None:
            raise SignerNotReadyError("the signing key is not loaded yet")
        return self.signer_or_none


DEV_DERIVED_KEY_ID = "dev-derived"


async def _enrollment_key_id(deps: EnforcerDeps, account_id: str, presented: str) -> str:
    """The id of the active key ``presented`` is, or a refusal naming the rule."""
    key_id = enrollment_key_id(presented)
    if key_id is not None:
        record = await deps.enrollment_keys.get(account_id, key_id)
        return check_enrollment_key(record, account_id, presented)
    if (
        deps.dev_enrollment_secret is not None
        and enrollment_key_matches(deps.dev_enrollment_secret, account_id, presented)
        # The dev default retires with the account's first issued key: a rotation must lock out
        # every earlier key, the derived one included.
        and not await deps.enrollment_keys.any_issued(account_id)
    ):
        return DEV_DERIVED_KEY_ID
    raise EnrollmentKeyRejectedError(
        f"enrollment_key: not an active enrollment key of account {account_id}"
    )


def _key_actor(account_id: str, key_id: str) -> Actor:
    # Whoever holds an account's enrollment key acts for that account's partner.
    return Actor(sub=f"enrollment-key:{key_id}", role="partner", account_id=account_id)


async def enroll_agent(
    deps: EnforcerDeps,
    *,
    account_id: str,
    enrollment_key: str,
    hostname: str,
    platform: Platform,
    endpoint_id: str | None = None,
) -> Enrollment:
    """Check the rate and the key, then enroll a new endpoint or re-enroll ``endpoint_id``.

    Re-enrolling an endpoint of the account issues it a new token and revokes the old one; its
    desired policy and sequence stay. Whoever holds a valid enrollment key of the account can do
    this to any of its endpoints, so every re-enrollment is rate-limited, audited on audit.v1,
    and kills the previous token: the real agent's next poll gets 401 and it alarms.
    """
    # Counted before the key is checked: wrong guesses use up the window like right ones.
    rate = await deps.enrollment_rate.hit(account_id)
    if not rate.allowed:
        raise EnrollmentRateLimitedError(
            f"enrollment rate: account {account_id} may make at most {rate.limit} enrollment "
            f"attempts per minute; retry in {rate.retry_after_s} s",
            rate.retry_after_s,
        )
    key_id = await _enrollment_key_id(deps, account_id, enrollment_key)
    token = new_agent_token()
    enrolled_at = utcnow()
    if endpoint_id is not None:
        outcome = await deps.agents.reissue_token(
            endpoint_id, account_id, token_digest(token), enrolled_at.isoformat()
        )
        if outcome is ReissueOutcome.OTHER_ACCOUNT:
            await _audit_reenrollment(deps, account_id, endpoint_id, key_id, "denied", outcome)
            raise EndpointOfAnotherAccountError(
                f"endpoint_id: endpoint {endpoint_id} is not enrolled in account {account_id}"
            )
        if outcome is ReissueOutcome.REISSUED:
            # After the swap: an audit failure answers 503 and this token is never shown; the
            # agent retries and the next attempt is audited.
            await _audit_reenrollment(deps, account_id, endpoint_id, key_id, "ok", outcome)
            log.warning(
                "agent re-enrolled: new token issued, the previous one is revoked",
                extra={"account_id": account_id, "endpoint_id": endpoint_id, "key_id": key_id},
            )
            return Enrollment(agent_id=endpoint_id, agent_token=token)
    record = AgentRecord(
        agent_id=endpoint_id or str(uuid.uuid4()),
        account_id=account_id,
        hostname=hostname,
        platform=platform,
        token_sha256=token_digest(token),
        enrolled_at=enrolled_at.isoformat(),
    )
    created = await deps.agents.create(record)
    if created is CreateOutcome.ACCOUNT_FULL:
        raise EndpointLimitReachedError(
            f"account_id: account {account_id} has reached its limit of enrolled endpoints"
        )
    if created is CreateOutcome.ID_TAKEN:
        # Another request re-created this id between our look and our write.
        raise EnrollmentConflictError(
            f"endpoint_id: endpoint {record.agent_id} was enrolled concurrently; retry"
        )
    registered = EndpointRegistered(
        endpoint_id=record.agent_id,
        account_id=account_id,
        hostname=hostname,
        platform=platform,
        enrolled_at=enrolled_at,
    )
    try:
        # The endpoint must be on endpoints.v1 before the agent learns its id, so the isolation
        # service can know it before anyone asks to isolate it.
        await deps.events.endpoint_registered(registered)
        if endpoint_id is not None:
            await _audit_reenrollment(
                deps, account_id, endpoint_id, key_id, "ok", ReissueOutcome.UNKNOWN
            )
    except BaseException:
        # The caller never sees this token; drop the record so no orphan credential stays valid.
        await deps.agents.delete(record)
        raise
    log.info(
        "agent enrolled",
        extra={
            "account_id": account_id,
            "endpoint_id": record.agent_id,
            "hostname": hostname,
            "key_id": key_id,
            "recreated": endpoint_id is not None,
        },
    )
    return Enrollment(agent_id=record.agent_id, agent_token=token)


async def _audit_reenrollment(
    deps: EnforcerDeps,
    account_id: str,
    endpoint_id: str,
    key_id: str,
    outcome: Literal["ok", "denied"],
    found: ReissueOutcome,
) -> None:
    detail = {
        ReissueOutcome.REISSUED: "new agent token issued; the previous token is revoked",
        ReissueOutcome.UNKNOWN: "endpoint unknown to this enforcer; re-created with its id",
        ReissueOutcome.OTHER_ACCOUNT: "403 endpoint_id.same_account: enrolled in another account",
    }[found]
    await deps.events.audit_recorded(
        AuditRecorded(
            service="enforcer",
            action="agent.reenroll",
            outcome=outcome,
            actor=_key_actor(account_id, key_id),
            account_id=account_id,
            endpoint_id=endpoint_id,
            detail=detail,
        )
    )


# --- enrollment keys (user JWT) ---------------------------------------------------------


async def authorize_key_admin(
    deps: EnforcerDeps, principal: Actor, account_id: str, action: str
) -> None:
    """The SOC manages any account's keys, a partner only its own; refusals are audited.

    The ``service`` role is refused: no service needs to mint enrollment credentials.
    """
    if principal.role == "soc" or (
        principal.role == "partner" and principal.account_id == account_id
    ):
        return
    error = AccountAccessDeniedError(
        f"account_id: a {principal.role} token of account {principal.account_id!r} may not "
        f"manage the enrollment keys of account {account_id!r}"
    )
    log.warning(
        "refused enrollment-key access",
        extra={"account_id": account_id, "sub": principal.sub, "action": action},
    )
    await deps.events.audit_recorded(
        AuditRecorded(
            service="enforcer",
            action=action,
            outcome="denied",
            actor=principal,
            account_id=account_id,
            detail=f"403 account_id.forbidden: {error}",
        )
    )
    raise error


async def list_enrollment_keys(deps: EnforcerDeps, account_id: str) -> list[EnrollmentKeyRecord]:
    return await deps.enrollment_keys.for_account(account_id)


async def rotate_enrollment_key(
    deps: EnforcerDeps, principal: Actor, account_id: str
) -> IssuedEnrollmentKey:
    """Issue a new key and revoke every earlier one; agents already enrolled keep their tokens."""
    key_id, key = new_enrollment_key()
    record = EnrollmentKeyRecord(
        key_id=key_id,
        account_id=account_id,
        key_sha256=enrollment_key_digest(key),
        created_at=utcnow().isoformat(),
        created_by=principal.sub,
    )
    revoked = await deps.enrollment_keys.rotate(record)
    try:
        await deps.events.audit_recorded(
            AuditRecorded(
                service="enforcer",
                action="enrollment_key.rotate",
                outcome="ok",
                actor=principal,
                account_id=account_id,
                detail=f"issued key {key_id}; revoked {', '.join(revoked) or 'none'}",
                after={"key_id": key_id, "revoked_key_ids": revoked},
            )
        )
    except BaseException:
        # An unaudited key must not work: the caller never sees it, so it is revoked at once.
        await deps.enrollment_keys.revoke(account_id, key_id, utcnow().isoformat())
        raise
    log.info(
        "enrollment key rotated",
        extra={"account_id": account_id, "key_id": key_id, "sub": principal.sub},
    )
    return IssuedEnrollmentKey(record=record, enrollment_key=key, revoked_key_ids=revoked)


async def revoke_enrollment_key(
    deps: EnforcerDeps, principal: Actor, account_id: str, key_id: str
) -> EnrollmentKeyRecord:
    """Refuse ``key_id`` for new enrollments from now on (idempotent)."""
    record = await deps.enrollment_keys.revoke(account_id, key_id, utcnow().isoformat())
    if record is None:
        raise EnrollmentKeyNotFoundError(
            f"key_id: account {account_id} has no enrollment key {key_id!r}"
        )
    await deps.events.audit_recorded(
        AuditRecorded(
            service="enforcer",
            action="enrollment_key.revoke",
            outcome="ok",
            actor=principal,
            account_id=account_id,
            detail=f"revoked key {key_id}",
            after={"key_id": key_id, "revoked_at": record.revoked_at},
        )
    )
    log.info(
        "enrollment key revoked",
        extra={"account_id": account_id, "key_id": key_id, "sub": principal.sub},
    )
    return record


async def authenticate_agent(deps: EnforcerDeps, token: str, agent_id: str) -> AgentIdentity:
    """The agent of the route, if ``token`` is its token (checked in the endpoint's own slot)."""
    identity = await deps.agents.identity(agent_id, token_digest(token))
    if identity is None:
        raise UnknownAgentTokenError(f"invalid agent token for agent {agent_id}")
    return identity


async def store_policy_commands(
    deps: EnforcerDeps, commands: Sequence[EnforcePolicy], lane: Lane
) -> LaneBatchResult:
    """Make each endpoint's newest commanded policy its desired one; older and duplicates change nothing."""
    newest, superseded = newest_per_endpoint(commands)
    signer = deps.signer
    # Signed once here, when stored: every poll then serves the stored bytes as they are.
    items = [
        PolicyToStore(
            policy=command.policy,
            signed_json=signer.sign(command.policy).model_dump_json().encode(),
        )
        for command in newest
    ]
    outcomes = await deps.policies.store_if_newer(items, lane)
    result = LaneBatchResult(stale=len(superseded))
    for command, outcome in zip(newest, outcomes, strict=True):
        policy = command.policy
        context = {
            "account_id": policy.account_id,
            "endpoint_id": policy.endpoint_id,
            "sequence": policy.sequence,
            "lane": lane,
        }
        if outcome is StoreOutcome.STORED:
            result.stored += 1
            log.debug("desired policy stored", extra=context)
        elif outcome is StoreOutcome.STALE:
            result.stale += 1
            log.debug("stale or duplicate policy command ignored", extra=context)
        else:
            reason = (
                f"policy.account_id: endpoint {policy.endpoint_id} is enrolled in another "
                f"account than {policy.account_id}"
            )
            log.warning("policy for another account's endpoint rejected", extra=context)
            result.rejected.append((command, reason))
    return result


async def poll_policy(
    deps: EnforcerDeps, token: str, endpoint_id: str, *, after: int, wait: float
) -> HeldPolicy | None:
    """The desired policy if its sequence is above ``after``, waiting up to ``wait`` seconds.

    Each check is one Redis round trip that also authenticates the token (a token revoked by a
    re-enrollment during the wait stops it): an idle check compares the stored sequence and
    never reads the signed policy. Between checks the poll waits for a wake-up of its endpoint.
    Once the process drains (shutting down) a poll answers after its next check: nothing newer
    is a 204 the agent follows with a new poll, to another instance or to this one restarted.
    """
    digest = token_digest(token)
    deadline = time.monotonic() + wait
    with deps.wakeups.waiter(endpoint_id) as waiter:
        while True:
            # Armed before reading: a policy stored after the read wakes the waiter, none is missed.
            waiter.arm()
            found = await deps.policies.poll(endpoint_id, digest, after)
            if found.identity is None:
                raise UnknownAgentTokenError(f"invalid agent token for agent {endpoint_id}")
            if found.newer is not None:
                return found.newer
            remaining = deadline - time.monotonic()
            if remaining <= 0 or deps.wakeups.draining:
                return None
            await waiter.wait(remaining)


async def report_policy_status(
    deps: EnforcerDeps,
    identity: AgentIdentity,
    *,
    sequence: int,
    policy_id: str,
    status: DeliveryStatus,
    rules_sha256: str | None,
    detail: str,
) -> PolicyStatusReported:
    """Record the agent's outcome for the desired sequence and publish it on isolation.status.v1."""
    check_status_consistency(status, rules_sha256, detail)
    # One round trip: the store marks the state only if the report names the desired policy,
    # and answers what that policy is, so a refusal names it (and nothing was marked).
    desired = await deps.policies.record_delivery(identity.agent_id, sequence, policy_id, status)
    check_status_report(desired, identity.agent_id, sequence, policy_id)
    report = PolicyStatusReported(
        endpoint_id=identity.agent_id,
        account_id=identity.account_id,
        policy_id=policy_id,
        sequence=sequence,
        status=status,
        rules_sha256=rules_sha256,
        detail=detail,
    )
    # Published (acks=all) before the agent hears 202: an acknowledged report is never lost.
    await deps.events.policy_status_reported(report)
    log.info(
        "policy status reported",
        extra={
            "account_id": identity.account_id,
            "endpoint_id": identity.agent_id,
            "sequence": sequence,
            "status": status,
        },
    )
    return report


async def report_usage(
    deps: EnforcerDeps,
    identity: AgentIdentity,
    *,
    sequence: int,
    counters: tuple[AllowlistUsage, ...],
) -> AllowlistUsageReported:
    """Publish the agent's usage deltas for the policy it holds on isolation.status.v1.

    Counts only ever belong to the endpoint's held policy: a report naming another sequence (a
    superseded policy, or one never issued) is refused with 409, so it cannot be mixed in.
    """
    held = await deps.policies.held(identity.agent_id)
    if held is None or held.sequence != sequence:
        raise PolicyNotHeldError(
            f"sequence {sequence} is not the endpoint's held policy"
            + ("" if held is None else f" (held: {held.sequence})")
        )
    message = AllowlistUsageReported(
        endpoint_id=identity.agent_id,
        account_id=identity.account_id,
        sequence=sequence,
        counters=counters,
    )
    # Published (acks=all) before the agent hears 202: an acknowledged report is never lost.
    await deps.events.allowlist_usage_reported(message)
    return message
