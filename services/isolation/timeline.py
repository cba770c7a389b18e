"""An endpoint's isolation timeline: the policies issued and what the agent reported (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.isolation.domain import EndpointIsolation
from shared.messages import PolicyMode

# Events kept per endpoint (about 100 policies with their outcome): older ones are trimmed by
# the same script that stores the state change, so the list never grows without bound.
TIMELINE_MAX_EVENTS = 200
TIMELINE_MAX_POLICIES = 100

TimelineKind = Literal["issued", "applied", "failed"]
PolicyOutcome = Literal["pending", "applied", "failed"]


class TimelineEvent(BaseModel):
    """One stored state change: a policy issued, or the agent's report on it.

    A report names its policy by sequence alone (unique per endpoint): its policy id and mode
    are the issued event's. Reports stored by earlier versions also carry both; either reads.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: TimelineKind
    at: datetime
    sequence: int
    policy_id: str = ""
    mode: PolicyMode | None = None
    settings_version: int = 0
    issued_by: str = ""
    reason: str = ""
    request_ids: tuple[str, ...] = ()
    detail: str = ""
    rules_sha256: str | None = None


class TimelinePolicy(BaseModel):
    """A policy issued to the endpoint: when, who, why, what, and how the agent answered."""

    model_config = ConfigDict(frozen=True)

    sequence: int = Field(description="The policy's sequence on the endpoint.")
    policy_id: str
    mode: PolicyMode = Field(description="standard, strict, or none (a release).")
    issued_at: datetime
    issued_by: str = Field(description="Subject of the token that asked for it.")
    reason: str
    settings_version: int = Field(description="Allowlist version frozen into the policy.")
    request_ids: tuple[str, ...]
    status: PolicyOutcome = Field(description="The agent's newest report: pending until one.")
    reported_at: datetime | None = Field(description="When the agent reported it.")
    detail: str = Field(description="The agent's detail (the reason on failure).")
    rules_sha256: str | None = Field(description="SHA-256 of the rules the agent applied.")


def timeline_event(isolation: EndpointIsolation, *, issued: bool) -> TimelineEvent | None:
    """The event a stored change of ``isolation`` records (None if it is not about a policy)."""
    policy = isolation.policy
    if policy is None:
        return None
    if issued:
        return TimelineEvent(
            kind="issued",
            at=policy.issued_at,
            sequence=policy.sequence,
            policy_id=policy.policy_id,
            mode=policy.mode,
            settings_version=policy.settings_version,
            issued_by=policy.issued_by,
            reason=policy.reason,
            request_ids=isolation.request_ids,
        )
    kind: TimelineKind
    if isolation.state == "failed":
        kind = "failed"
    elif isolation.state in ("isolated", "not_isolated"):
        kind = "applied"
    else:
        return None
    return TimelineEvent(
        kind=kind,
        at=isolation.updated_at or policy.issued_at,
        sequence=isolation.desired_sequence,
        detail=isolation.detail,
        rules_sha256=isolation.rules_sha256,
    )


def fold_timeline(events: Iterable[TimelineEvent], limit: int) -> list[TimelinePolicy]:
    """Newest policy first, each with its newest report; reports of trimmed policies are dropped."""
    issued: dict[str, TimelineEvent] = {}
    reports: dict[int, list[TimelineEvent]] = {}
    for event in events:
        if event.kind == "issued":
            if event.mode is not None:  # always set on an issued event
                issued.setdefault(event.policy_id, event)
        else:
            reports.setdefault(event.sequence, []).append(event)
    policies = []
    for event in sorted(issued.values(), key=lambda e: (e.sequence, e.at), reverse=True)[:limit]:
        report: TimelineEvent | None = None
        for candidate in reports.get(event.sequence, ()):
            # An earlier version's report names its policy: one on another policy never counts.
            if candidate.policy_id not in ("", event.policy_id):
                continue
            if report is None or candidate.at >= report.at:
                report = candidate
        status: PolicyOutcome = "pending"
        if report is not None:
            status = "applied" if report.kind == "applied" else "failed"
        policies.append(
            TimelinePolicy(
                sequence=event.sequence,
                policy_id=event.policy_id,
                mode=event.mode or "none",
                issued_at=event.at,
                issued_by=event.issued_by,
                reason=event.reason,
                settings_version=event.settings_version,
                request_ids=event.request_ids,
                status=status,
                reported_at=None if report is None else report.at,
                detail="" if report is None else report.detail,
                rules_sha256=None if report is None else report.rules_sha256,
            )
        )
    return policies
