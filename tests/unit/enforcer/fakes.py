"""In-memory fakes of the enforcer's ports, with the same fencing semantics as the Redis store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

from services.enforcer.adapters.wakeups import PolicyWaiter
from services.enforcer.domain import (
    AgentIdentity,
    CreateOutcome,
    DesiredPolicyRef,
    EnrollmentKeyRecord,
    HeldPolicy,
    Lane,
    ReissueOutcome,
    StoreOutcome,
)
from services.enforcer.handlers import (
    AgentRecord,
    EnforcerDeps,
    PolicyToStore,
    PollResult,
    RateDecision,
)
from services.enforcer.signing import PolicySigner, generate_private_key_b64, parse_private_key
from shared.messages import (
    AllowlistUsageReported,
    AuditRecorded,
    EndpointRegistered,
    PolicyStatusReported,
)

SECRET = "unit-test-enrollment-secret-0123456789abcdef"


class InMemoryAgents:
    def __init__(self, max_per_account: int = 10_000) -> None:
        self.by_id: dict[str, AgentRecord] = {}
        self.by_token: dict[str, AgentRecord] = {}
        self.max_per_account = max_per_account

    async def create(self, record: AgentRecord) -> CreateOutcome:
        if record.agent_id in self.by_id:
            return CreateOutcome.ID_TAKEN
        in_account = sum(r.account_id == record.account_id for r in self.by_id.values())
        if in_account >= self.max_per_account:
            return CreateOutcome.ACCOUNT_FULL
        self.by_id[record.agent_id] = record
        self.by_token[record.token_sha256] = record
        return CreateOutcome.CREATED

    async def reissue_token(
        self, agent_id: str, account_id: str, token_sha256: str, reenrolled_at: str
    ) -> ReissueOutcome:
        record = self.by_id.get(agent_id)
        if record is None:
            return ReissueOutcome.UNKNOWN
        if record.account_id != account_id:
            return ReissueOutcome.OTHER_ACCOUNT
        self.by_token.pop(record.token_sha256, None)
        record = dataclasses.replace(record, token_sha256=token_sha256)
        self.by_id[agent_id] = self.by_token[token_sha256] = record
        return ReissueOutcome.REISSUED

    async def delete(self, record: AgentRecord) -> None:
        self.by_id.pop(record.agent_id, None)
        self.by_token.pop(record.token_sha256, None)

    async def identity(self, agent_id: str, token_sha256: str) -> AgentIdentity | None:
        record = self.by_id.get(agent_id)
        if record is None or record.token_sha256 != token_sha256:
            return None
        return AgentIdentity(record.agent_id, record.account_id)


class InMemoryEnrollmentKeys:
    def __init__(self) -> None:
        self.by_account: dict[str, dict[str, EnrollmentKeyRecord]] = {}

    async def get(self, account_id: str, key_id: str) -> EnrollmentKeyRecord | None:
        return self.by_account.get(account_id, {}).get(key_id)

    async def for_account(self, account_id: str) -> list[EnrollmentKeyRecord]:
        return sorted(self.by_account.get(account_id, {}).values(), key=lambda r: r.created_at)

    async def any_issued(self, account_id: str) -> bool:
        return bool(self.by_account.get(account_id))

    async def rotate(self, record: EnrollmentKeyRecord) -> list[str]:
        keys = self.by_account.setdefault(record.account_id, {})
        revoked = sorted(k for k, r in keys.items() if r.active)
        for key_id in revoked:
            keys[key_id] = dataclasses.replace(keys[key_id], revoked_at=record.created_at)
        keys[record.key_id] = record
        return revoked

    async def revoke(
        self, account_id: str, key_id: str, revoked_at: str
    ) -> EnrollmentKeyRecord | None:
        keys = self.by_account.get(account_id, {})
        record = keys.get(key_id)
        if record is not None and record.active:
            record = keys[key_id] = dataclasses.replace(record, revoked_at=revoked_at)
        return record


class CountingRateLimiter:
    def __init__(self, per_minute: int = 1000) -> None:
        self.per_minute = per_minute
        self.counts: dict[str, int] = {}

    async def hit(self, account_id: str) -> RateDecision:
        self.counts[account_id] = self.counts.get(account_id, 0) + 1
        return RateDecision(self.counts[account_id] <= self.per_minute, self.per_minute, 60)


class InMemoryWakeups:
    def __init__(self) -> None:
        self.waiters: dict[str, set[PolicyWaiter]] = {}
        self.draining = False

    @contextlib.contextmanager
    def waiter(self, endpoint_id: str) -> Iterator[PolicyWaiter]:
        waiter = PolicyWaiter()
        self.waiters.setdefault(endpoint_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            self.waiters[endpoint_id].discard(waiter)

    def notify(self, endpoint_id: str) -> None:
        for waiter in self.waiters.get(endpoint_id, ()):
            waiter.wake()


class InMemoryPolicies:
    def __init__(self, agents: InMemoryAgents, wakeups: InMemoryWakeups) -> None:
        self.held_by_endpoint: dict[str, HeldPolicy] = {}
        self.delivery: dict[str, tuple[int, str]] = {}
        self.lanes: dict[str, Lane] = {}
        self.polls = 0
        self._agents = agents
        self._wakeups = wakeups

    async def store_if_newer(
        self, items: Sequence[PolicyToStore], lane: Lane
    ) -> list[StoreOutcome]:
        outcomes = []
        for item in items:
            policy = item.policy
            agent = self._agents.by_id.get(policy.endpoint_id)
            held = self.held_by_endpoint.get(policy.endpoint_id)
            if agent is not None and agent.account_id != policy.account_id:
                outcomes.append(StoreOutcome.WRONG_ACCOUNT)
            elif held is not None and held.sequence >= policy.sequence:
                outcomes.append(StoreOutcome.STALE)
            else:
                self.held_by_endpoint[policy.endpoint_id] = HeldPolicy(
                    policy.endpoint_id,
                    policy.account_id,
                    policy.policy_id,
                    policy.sequence,
                    item.signed_json,
                )
                self.lanes[policy.endpoint_id] = lane
                self.delivery[policy.endpoint_id] = (policy.sequence, "pending")
                self._wakeups.notify(policy.endpoint_id)
                outcomes.append(StoreOutcome.STORED)
        return outcomes

    async def held(self, endpoint_id: str) -> HeldPolicy | None:
        return self.held_by_endpoint.get(endpoint_id)

    async def poll(self, endpoint_id: str, token_sha256: str, after: int) -> PollResult:
        self.polls += 1
        identity = await self._agents.identity(endpoint_id, token_sha256)
        held = self.held_by_endpoint.get(endpoint_id)
        if identity is None or held is None or held.sequence <= after:
            return PollResult(identity, None)
        return PollResult(identity, held)

    async def record_delivery(
        self, endpoint_id: str, sequence: int, policy_id: str, status: str
    ) -> DesiredPolicyRef | None:
        held = self.held_by_endpoint.get(endpoint_id)
        if held is None:
            return None
        if (held.sequence, held.policy_id) == (sequence, policy_id):
            self.delivery[endpoint_id] = (sequence, status)
        return DesiredPolicyRef(held.sequence, held.policy_id)


class RecordingEvents:
    def __init__(self) -> None:
        self.registered: list[EndpointRegistered] = []
        self.reports: list[PolicyStatusReported] = []
        self.usage: list[AllowlistUsageReported] = []
        self.audits: list[AuditRecorded] = []
        self.fail_next = False
        self.fail_next_audit = False

    async def endpoint_registered(self, message: EndpointRegistered) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("broker unavailable")
        self.registered.append(message)

    async def policy_status_reported(self, message: PolicyStatusReported) -> None:
        self.reports.append(message)

    async def allowlist_usage_reported(self, message: AllowlistUsageReported) -> None:
        self.usage.append(message)

    async def audit_recorded(self, message: AuditRecorded) -> None:
        if self.fail_next_audit:
            self.fail_next_audit = False
            raise ConnectionError("broker unavailable")
        self.audits.append(message)


def make_deps() -> tuple[EnforcerDeps, InMemoryAgents, InMemoryPolicies, RecordingEvents]:
    agents = InMemoryAgents()
    wakeups = InMemoryWakeups()
    policies = InMemoryPolicies(agents, wakeups)
    events = RecordingEvents()
    deps = EnforcerDeps(
        agents=agents,
        policies=policies,
        events=events,
        wakeups=wakeups,
        enrollment_keys=InMemoryEnrollmentKeys(),
        enrollment_rate=CountingRateLimiter(),
        dev_enrollment_secret=SECRET,
        signer_or_none=PolicySigner(parse_private_key(generate_private_key_b64())),
    )
    return deps, agents, policies, events


async def yield_to_loop() -> None:
    await asyncio.sleep(0)
