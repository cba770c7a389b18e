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
    AgentIdentity,
    EnrollmentKeyRejectedError,
    HeldPolicy,
    Lane,
    StoreOutcome,
    UnknownAgentTokenError,
    check_agent_scope,
    check_status_consistency,
    check_status_report,
    new_agent_token,
    newest_per_endpoint,
    token_digest,
)
from services.enforcer.signing import PolicySigner
from shared.enrollment import enrollment_key_matches
from shared.messages import (
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


class AgentStore(Protocol):
    async def create(self, record: AgentRecord) -> None: ...

    async def delete(self, record: AgentRecord) -> None: ...

    async def identity_for_token(self, token_sha256: str) -> AgentIdentity | None: ...


class PolicyStore(Protocol):
    async def store_if_newer(
        self, items: Sequence[PolicyToStore], lane: Lane
    ) -> list[StoreOutcome]: ...

    async def held(self, endpoint_id: str) -> HeldPolicy | None: ...

    async def mark_delivery(self, endpoint_id: str, sequence: int, status: str) -> None: ...


class EventPublisher(Protocol):
    async def endpoint_registered(self, message: EndpointRegistered) -> None: ...

    async def policy_status_reported(self, message: PolicyStatusReported) -> None: ...


class PolicyWaiter(Protocol):
    def arm(self) -> None: ...

    async def wait(self, timeout: float) -> bool: ...


class PolicyWakeups(Protocol):
    def waiter(self, endpoint_id: str) -> AbstractContextManager[PolicyWaiter]: ...


class SignerNotReadyError(RuntimeError):
    """The signing key has not been loaded yet (startup not finished)."""


@dataclass
class EnforcerDeps:
    """Everything the use cases depend on, as protocols."""

    enrollment_secret: str
    agents: AgentStore
    policies: PolicyStore
    events: EventPublisher
    wakeups: PolicyWakeups
    signer_or_none: PolicySigner | None = None

    @property
    def signer(self) -> PolicySigner:
        if self.signer_or_none is None:
            raise SignerNotReadyError("the signing key is not loaded yet")
        return self.signer_or_none


async def enroll_agent(
    deps: EnforcerDeps, *, account_id: str, enrollment_key: str, hostname: str, platform: Platform
) -> Enrollment:
    """Check the account's enrollment key, store the agent, publish the endpoint, hand out a token."""
    if not enrollment_key_matches(deps.enrollment_secret, account_id, enrollment_key):
        raise EnrollmentKeyRejectedError(
            f"enrollment_key: does not match the enrollment key of account {account_id}"
        )
    token = new_agent_token()
    enrolled_at = utcnow()
    record = AgentRecord(
        agent_id=str(uuid.uuid4()),
        account_id=account_id,
        hostname=hostname,
        platform=platform,
        token_sha256=token_digest(token),
        enrolled_at=enrolled_at.isoformat(),
    )
    await deps.agents.create(record)
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
    except BaseException:
        # The caller never sees this token; drop the record so no orphan credential stays valid.
        await deps.agents.delete(record)
        raise
    log.info(
        "agent enrolled",
        extra={"account_id": account_id, "endpoint_id": record.agent_id, "hostname": hostname},
    )
    return Enrollment(agent_id=record.agent_id, agent_token=token)


async def authenticate_agent(deps: EnforcerDeps, token: str, agent_id: str) -> AgentIdentity:
    """The agent behind ``token``, if it is the agent of the route."""
    identity = await deps.agents.identity_for_token(token_digest(token))
    if identity is None:
        raise UnknownAgentTokenError("invalid agent token")
    check_agent_scope(identity, agent_id)
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


async def wait_for_policy(
    deps: EnforcerDeps, endpoint_id: str, *, after: int, wait: float
) -> HeldPolicy | None:
    """The desired policy if its sequence is above ``after``, waiting up to ``wait`` seconds for one."""
    deadline = time.monotonic() + wait
    with deps.wakeups.waiter(endpoint_id) as waiter:
        while True:
            # Armed before reading: a policy stored after the read wakes the waiter, none is missed.
            waiter.arm()
            held = await deps.policies.held(endpoint_id)
            if held is not None and held.sequence > after:
                return held
            remaining = deadline - time.monotonic()
            if remaining <= 0:
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
    held = await deps.policies.held(identity.agent_id)
    check_status_report(held, identity.agent_id, sequence, policy_id)
    report = PolicyStatusReported(
        endpoint_id=identity.agent_id,
        account_id=identity.account_id,
        policy_id=policy_id,
        sequence=sequence,
        status=status,
        rules_sha256=rules_sha256,
        detail=detail,
    )
    await deps.policies.mark_delivery(identity.agent_id, sequence, status)
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
