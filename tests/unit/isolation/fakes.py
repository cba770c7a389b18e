"""In-memory fakes of the isolation service's ports, with the same semantics as the adapters."""

from __future__ import annotations

from services.isolation.domain import (
    EndpointIsolation,
    EndpointRecord,
    Lane,
    RequestOutcome,
    Revocation,
)
from services.isolation.handlers import CommitConflictError, DuplicateRequest
from shared.messages import (
    Actor,
    AllowlistChanged,
    AuditRecorded,
    EnforcePolicy,
    IsolateEndpoint,
    IsolationStateChanged,
    RefreshIsolation,
    ReleaseEndpoint,
    RevokeEndpointPeer,
    StrictIsolateAccount,
)

AnyRequest = (
    IsolateEndpoint | ReleaseEndpoint | StrictIsolateAccount | RevokeEndpointPeer | RefreshIsolation
)


class MemoryStore:
    """State with a revision per endpoint and request outcomes, committed together."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[EndpointIsolation, int]] = {}
        self.outcomes: dict[str, RequestOutcome] = {}
        self.sent: set[str] = set()

    async def load(self, endpoint_id: str) -> tuple[EndpointIsolation | None, int]:
        state, rev = self.states.get(endpoint_id, (None, 0))
        return state, rev

    async def load_many(self, endpoint_ids: list[str]) -> list[EndpointIsolation]:
        return [self.states[e][0] for e in endpoint_ids if e in self.states]

    async def outcome(self, endpoint_id: str, request_key: str) -> RequestOutcome | None:
        found = self.outcomes.get(request_key)
        if found is None:
            return None
        return found.model_copy(update={"sent": request_key in self.sent})

    async def begin(
        self, endpoint_id: str, account_id: str, request_key: str
    ) -> tuple[RequestOutcome | None, EndpointIsolation | None, int]:
        state, rev = await self.load(endpoint_id)
        return await self.outcome(endpoint_id, request_key), state, rev

    async def mark_sent(self, endpoint_id: str, request_key: str) -> None:
        self.sent.add(request_key)

    async def commit(
        self,
        current_rev: int,
        isolation: EndpointIsolation,
        *,
        changed: bool,
        request_key: str | None = None,
        outcome: RequestOutcome | None = None,
    ) -> None:
        if request_key and request_key in self.outcomes:
            prior = self.outcomes[request_key]
            raise DuplicateRequest(prior.model_copy(update={"sent": request_key in self.sent}))
        if self.states.get(isolation.endpoint_id, (None, 0))[1] != current_rev:
            raise CommitConflictError(isolation.endpoint_id)
        if changed:
            self.states[isolation.endpoint_id] = (isolation, current_rev + 1)
        if request_key and outcome:
            self.outcomes[request_key] = outcome

    async def active_endpoints(self, account_id: str) -> list[str]:
        return sorted(
            e
            for e, (s, _) in self.states.items()
            if s.account_id == account_id and s.isolated_or_pending
        )


class MemorySettings:
    def __init__(self) -> None:
        self.by_account: dict[str, AllowlistChanged] = {}
        self.catch_ups = 0

    async def current(self, account_id: str) -> AllowlistChanged | None:
        self.catch_ups += 1
        return self.by_account.get(account_id)

    async def known(self, account_id: str) -> AllowlistChanged | None:
        return self.by_account.get(account_id)


class MemoryRegistry:
    def __init__(self, *endpoints: EndpointRecord) -> None:
        self.endpoints = {e.endpoint_id: e for e in endpoints}

    async def get(self, endpoint_id: str) -> EndpointRecord | None:
        return self.endpoints.get(endpoint_id)


class MemoryPublisher:
    def __init__(self) -> None:
        self.commands: list[tuple[Lane, EnforcePolicy]] = []
        self.audits: list[AuditRecorded] = []
        self.requests: list[tuple[Lane, AnyRequest]] = []
        self.events: list[IsolationStateChanged] = []
        self.fail_next_command = False

    async def send_command(
        self,
        lane: Lane,
        command: EnforcePolicy,
        audit: AuditRecorded,
        event: IsolationStateChanged | None = None,
    ) -> None:
        if self.fail_next_command:
            self.fail_next_command = False
            raise ConnectionError("broker gone")
        self.commands.append((lane, command))
        self.audits.append(audit)
        if event is not None:
            self.events.append(event)

    async def send_event(self, event: IsolationStateChanged) -> None:
        self.events.append(event)

    async def send_audit(self, audit: AuditRecorded) -> None:
        self.audits.append(audit)

    async def send_request(self, lane: Lane, request: AnyRequest) -> None:
        self.requests.append((lane, request))

    async def send_requests(
        self, lane: Lane, requests: list[IsolateEndpoint | RevokeEndpointPeer]
    ) -> None:
        self.requests.extend((lane, request) for request in requests)


class MemorySettingsClient:
    def __init__(self) -> None:
        self.disabled: list[str] = []
        self.fail = False

    async def disable_allowlist(self, account_id: str, requested_by: Actor) -> None:
        if self.fail:
            raise ConnectionError("settings service down")
        self.disabled.append(account_id)


class MemoryRevocationLog:
    """The account's revocations by settings version (the Redis log keeps the newest 200)."""

    def __init__(self) -> None:
        self.by_account: dict[str, dict[str, Revocation]] = {}

    async def record(self, revocation: Revocation) -> None:
        self.by_account.setdefault(revocation.account_id, {})[revocation.revocation_id] = revocation

    async def since(self, account_id: str, settings_version: int) -> list[Revocation]:
        found = self.by_account.get(account_id, {}).values()
        return sorted(
            (r for r in found if r.settings_version > settings_version),
            key=lambda r: r.settings_version,
        )
