"""One valid sample of every message type, for contract tests."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.messages import (
    Actor,
    AllowedPeer,
    AllowlistChanged,
    AllowlistEntry,
    AllowlistUsage,
    AllowlistUsageReported,
    AuditRecorded,
    DeadLetter,
    EndpointRegistered,
    EnforcePolicy,
    FrozenPolicy,
    IsolateEndpoint,
    IsolationStateChanged,
    Message,
    PolicyStatusReported,
    RefreshIsolation,
    ReleaseEndpoint,
    RevokeEndpointPeer,
    StrictIsolateAccount,
)
from shared.topics import TopicName

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SOC = Actor(sub="soc-analyst", role="soc")
PARTNER = Actor(sub="alice", role="partner", account_id="acct-1")


def sample_policy(sequence: int = 1) -> FrozenPolicy:
    return FrozenPolicy(
        policy_id="pol-1",
        endpoint_id="ep-1",
        account_id="acct-1",
        sequence=sequence,
        mode="standard",
        allowed_outbound=(AllowedPeer(name="RMM", address="203.0.113.10"),),
        platform=("198.51.100.1",),
        settings_version=3,
        issued_at=NOW,
        issued_by="alice",
        reason="incident 42",
    )


SAMPLES: list[tuple[TopicName, str, Message]] = [
    (
        TopicName.SETTINGS_ALLOWLIST,
        "acct-1",
        AllowlistChanged(
            account_id="acct-1",
            enabled=True,
            version=3,
            updated_at=NOW,
            changed_by=PARTNER,
            entries=(
                AllowlistEntry(
                    id="e1", name="RMM", address="203.0.113.10", created_at=NOW, created_by="alice"
                ),
            ),
        ),
    ),
    (
        TopicName.ENDPOINTS,
        "ep-1",
        EndpointRegistered(
            endpoint_id="ep-1",
            account_id="acct-1",
            hostname="web-01",
            platform="linux",
            enrolled_at=NOW,
        ),
    ),
    (
        TopicName.ISOLATION_REQUESTS,
        "ep-1",
        IsolateEndpoint(endpoint_id="ep-1", mode="standard", reason="x", requested_by=PARTNER),
    ),
    (TopicName.ISOLATION_REQUESTS, "ep-1", ReleaseEndpoint(endpoint_id="ep-1", requested_by=SOC)),
    (
        TopicName.ISOLATION_REQUESTS,
        "ep-1",
        RefreshIsolation(endpoint_id="ep-1", reason="new relay", requested_by=PARTNER),
    ),
    (
        TopicName.ISOLATION_REQUESTS_PRIORITY,
        "ep-1",
        RevokeEndpointPeer(
            request_id="rev-1:ep-1",
            endpoint_id="ep-1",
            account_id="acct-1",
            revocation_id="rev-1",
            entry=AllowlistEntry(
                id="e1", name="RMM", address="203.0.113.10", created_at=NOW, created_by="alice"
            ),
            settings_version=4,
            reason="RMM compromised",
            requested_by=PARTNER,
        ),
    ),
    (
        TopicName.ISOLATION_REQUESTS_PRIORITY,
        "ep-1",
        IsolateEndpoint(endpoint_id="ep-1", mode="strict", requested_by=SOC),
    ),
    (
        TopicName.ISOLATION_REQUESTS_PRIORITY,
        "acct-1",
        StrictIsolateAccount(account_id="acct-1", reason="rmm compromised", requested_by=SOC),
    ),
    (TopicName.ENFORCER_COMMANDS, "ep-1", EnforcePolicy(request_id="r1", policy=sample_policy())),
    (
        TopicName.ENFORCER_COMMANDS_PRIORITY,
        "ep-1",
        EnforcePolicy(request_id="r2", policy=sample_policy(2)),
    ),
    (
        TopicName.ISOLATION_STATUS,
        "ep-1",
        PolicyStatusReported(
            endpoint_id="ep-1",
            account_id="acct-1",
            policy_id="pol-1",
            sequence=1,
            status="applied",
            rules_sha256="a" * 64,
        ),
    ),
    (
        TopicName.ISOLATION_STATUS,
        "ep-1",
        AllowlistUsageReported(
            endpoint_id="ep-1",
            account_id="acct-1",
            sequence=1,
            counters=(
                AllowlistUsage(
                    address="203.0.113.10",
                    ports=(8041,),
                    protocol="tcp",
                    packets=3,
                    bytes=180,
                    last_seen=NOW,
                ),
            ),
        ),
    ),
    (
        TopicName.ISOLATION_EVENTS,
        "ep-1",
        IsolationStateChanged(
            endpoint_id="ep-1",
            account_id="acct-1",
            state="isolated",
            mode="standard",
            sequence=1,
            policy_id="pol-1",
            request_ids=("req-1",),
            settings_version=3,
            rules_sha256="a" * 64,
        ),
    ),
    (
        TopicName.AUDIT,
        "acct-1",
        AuditRecorded(
            service="settings",
            action="allowlist.entry.add",
            outcome="ok",
            actor=PARTNER,
            account_id="acct-1",
            before={"enabled": False},
            after={"enabled": True},
        ),
    ),
    (
        TopicName.DLQ,
        "x",
        DeadLetter(
            source_topic="t.isolation.requests.v1",
            source_partition=0,
            source_offset=7,
            consumer_group="isolation",
            reason="invalid message: mode: bad",
            payload="{}",
        ),
    ),
]
