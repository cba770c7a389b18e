"""Pure enforcer rules: sequence fencing, agent tokens and status-report checks (no I/O)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from shared.messages import EnforcePolicy

Lane = str  # "priority" | "normal"
PRIORITY_LANE: Lane = "priority"
NORMAL_LANE: Lane = "normal"


class EnforcerError(Exception):
    """Base of the enforcer's named errors."""


class EnrollmentKeyRejectedError(EnforcerError):
    """The enrollment key does not belong to the account."""


class UnknownAgentTokenError(EnforcerError):
    """The bearer token is not the token of any enrolled agent."""


class AgentScopeError(EnforcerError):
    """An agent token was used on another agent's route."""


class PolicyNotHeldError(EnforcerError):
    """A status report names a sequence the enforcer does not hold as the endpoint's desired policy."""


class StatusReportInvalidError(EnforcerError):
    """A status report is self-contradictory (applied without a hash, failed without a reason)."""


class StoreOutcome(StrEnum):
    """What happened to one command's policy in the desired-state store."""

    STORED = "stored"
    # The store already holds this or a newer sequence: fencing keeps the newer one.
    STALE = "stale"
    # The policy names another account than the one the endpoint enrolled in (tenancy).
    WRONG_ACCOUNT = "wrong_account"


@dataclass(frozen=True)
class AgentIdentity:
    """An enrolled agent as its token reveals it."""

    agent_id: str
    account_id: str


@dataclass(frozen=True)
class HeldPolicy:
    """The desired policy the enforcer holds for an endpoint, as stored (signed JSON)."""

    endpoint_id: str
    account_id: str
    policy_id: str
    sequence: int
    signed_json: bytes


def new_agent_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The only form in which a token is stored: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_newer(held_sequence: int | None, incoming_sequence: int) -> bool:
    """Fencing (guarantee 6): only a strictly higher sequence replaces the desired policy."""
    return held_sequence is None or incoming_sequence > held_sequence


def newest_per_endpoint(
    commands: Iterable[EnforcePolicy],
) -> tuple[list[EnforcePolicy], list[EnforcePolicy]]:
    """Split a batch into the newest command per endpoint and the ones it supersedes.

    Within one batch only the highest sequence per endpoint can win the compare-and-set, so the
    others need neither signing nor a round trip; they count as stale. Commands are grouped by
    endpoint *and* account, so a command naming a foreign account is never hidden behind a newer
    one: it reaches the store's tenancy check and is rejected on its own.
    """
    newest: dict[tuple[str, str], EnforcePolicy] = {}
    superseded: list[EnforcePolicy] = []
    for command in commands:
        key = (command.policy.endpoint_id, command.policy.account_id)
        current = newest.get(key)
        if current is None:
            newest[key] = command
        elif command.policy.sequence > current.policy.sequence:
            superseded.append(current)
            newest[key] = command
        else:
            superseded.append(command)
    return list(newest.values()), superseded


def check_agent_scope(identity: AgentIdentity, agent_id: str) -> None:
    """An agent token opens only its own agent's routes."""
    if identity.agent_id != agent_id:
        raise AgentScopeError(
            f"this agent token belongs to agent {identity.agent_id}, not to agent {agent_id}"
        )


def check_status_report(
    held: HeldPolicy | None,
    endpoint_id: str,
    sequence: int,
    policy_id: str,
) -> HeldPolicy:
    """A report must name the policy the enforcer currently holds as desired for the endpoint.

    A report about a superseded sequence is refused (409) rather than forwarded: the agent will
    receive the newer policy on its next poll, and the isolation service must only ever see
    reports about policies that were issued and are still in force.
    """
    if held is None:
        raise PolicyNotHeldError(
            f"sequence: endpoint {endpoint_id} has no policy; sequence {sequence} was never issued"
        )
    if sequence < held.sequence:
        raise PolicyNotHeldError(
            f"sequence: {sequence} is superseded by the desired sequence {held.sequence}"
        )
    if sequence > held.sequence:
        raise PolicyNotHeldError(
            f"sequence: {sequence} was never issued; the desired sequence is {held.sequence}"
        )
    if policy_id != held.policy_id:
        raise PolicyNotHeldError(
            f"policy_id: {policy_id!r} is not the policy of sequence {sequence} ({held.policy_id!r})"
        )
    return held


def check_status_consistency(status: str, rules_sha256: str | None, detail: str) -> None:
    """``applied`` needs the rules' hash (guarantee 7); ``failed`` needs the agent's reason."""
    if status == "applied" and not rules_sha256:
        raise StatusReportInvalidError("rules_sha256: required when status is 'applied'")
    if status == "failed" and not detail.strip():
        raise StatusReportInvalidError("detail: the reason is required when status is 'failed'")
