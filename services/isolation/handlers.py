"""Isolation use cases: apply requests, record agent status, answer the REST API."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NoReturn, Protocol

from services.isolation.domain import (
    Decision,
    EndpointIsolation,
    EndpointRecord,
    Lane,
    NothingToDo,
    PolicyContext,
    PolicyDiff,
    PolicyIssued,
    RequestDenied,
    RequestOutcome,
    Revocation,
    StatusIgnored,
    allows_peer,
    apply_status,
    decide_isolation,
    decide_refresh,
    decide_release,
    decide_revoke,
    fresh_isolation,
    pending_state_of,
    policy_diff,
    refresh_refusal,
    state_changed,
)
from shared.messages import (
    Actor,
    AllowedPeer,
    AllowlistChanged,
    AllowlistUsage,
    AllowlistUsageReported,
    AuditRecorded,
    EnforcePolicy,
    FrozenPolicy,
    IsolateEndpoint,
    IsolationMode,
    IsolationStateChanged,
    PolicyStatusReported,
    RefreshIsolation,
    ReleaseEndpoint,
    RevokeEndpointPeer,
    StrictIsolateAccount,
    new_id,
    utcnow,
)

AnyRequest = (
    IsolateEndpoint | ReleaseEndpoint | StrictIsolateAccount | RevokeEndpointPeer | RefreshIsolation
)
EndpointRequest = IsolateEndpoint | RevokeEndpointPeer

log = logging.getLogger(__name__)

_MAX_CONFLICT_RETRIES = 100
# An account-wide audit record names at most this many endpoints (each endpoint's own policy
# record names it too); the count is always complete.
_AUDIT_ENDPOINTS_MAX = 1000
# --- ports ----------------------------------------------------------------------------


class IsolationStore(Protocol):
    async def load(self, endpoint_id: str) -> tuple[EndpointIsolation | None, int]: ...
    async def load_many(self, endpoint_ids: list[str]) -> list[EndpointIsolation]: ...
    async def begin(
        self, endpoint_id: str, account_id: str, request_key: str
    ) -> tuple[RequestOutcome | None, EndpointIsolation | None, int]: ...
    async def commit(
        self,
        current_rev: int,
        isolation: EndpointIsolation,
        *,
        changed: bool,
        request_key: str | None = None,
        outcome: RequestOutcome | None = None,
    ) -> None: ...
    async def active_endpoints(self, account_id: str) -> list[str]: ...
    async def mark_sent(self, endpoint_id: str, request_key: str) -> None: ...


class UsageStore(Protocol):
    """Per endpoint: the usage counters accumulated for one policy sequence."""

    async def add(self, report: AllowlistUsageReported) -> bool:
        """Add the deltas (once per message id); a newer sequence starts from zero, an older
        one is ignored. True if they were added."""
        ...

    async def usage(self, endpoint_id: str) -> tuple[int, list[AllowlistUsage]]:
        """The stored sequence (0 if none) and its accumulated counters."""
        ...


class SettingsView(Protocol):
    async def current(self, account_id: str) -> AllowlistChanged | None: ...
    async def known(self, account_id: str) -> AllowlistChanged | None: ...


class Registry(Protocol):
    async def get(self, endpoint_id: str) -> EndpointRecord | None: ...


class Publisher(Protocol):
    async def send_command(
        self,
        lane: Lane,
        command: EnforcePolicy,
        audit: AuditRecorded,
        event: IsolationStateChanged | None = None,
    ) -> None: ...
    async def send_event(self, event: IsolationStateChanged) -> None: ...
    async def send_audit(self, audit: AuditRecorded) -> None: ...
    async def send_request(self, lane: Lane, request: AnyRequest) -> None: ...
    async def send_requests(self, lane: Lane, requests: list[EndpointRequest]) -> None: ...


class RevocationLog(Protocol):
    """The account's recent revocations, kept so an isolation racing a fan-out still loses it."""

    async def record(self, revocation: Revocation) -> None: ...
    async def since(self, account_id: str, settings_version: int) -> list[Revocation]: ...


class SettingsClient(Protocol):
    async def disable_allowlist(self, account_id: str, requested_by: Actor) -> None:
        """Raise SettingsRefusedError if refused for good; any other error is retried."""
        ...


# --- errors ---------------------------------------------------------------------------


class CommitConflictError(Exception):
    """Another writer changed the endpoint's state since it was read; read again and retry."""


class DuplicateRequest(Exception):
    """The request was already applied to this endpoint; ``outcome`` is what it did."""

    def __init__(self, outcome: RequestOutcome) -> None:
        super().__init__(outcome.kind)
        self.outcome = outcome


class SettingsRefusedError(Exception):
    """The settings service refused the change for good (4xx); retrying would not help."""


class EndpointNotFoundError(LookupError):
    """No endpoint with this id has enrolled."""


class AccountForbiddenError(PermissionError):
    """The caller may not touch this account (tenancy)."""


class StrictOverrideDeniedError(PermissionError):
    """A partner tried to release or loosen a strict isolation."""


class ConcurrentUpdateError(RuntimeError):
    """The endpoint's state kept changing under us; the consumer retries the record."""


class RefreshNotAllowedError(Exception):
    """The endpoint is not in standard isolation: strict, not isolated, or release pending."""


# --- use cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountStrictResult:
    """What an account-wide strict isolation did."""

    covered: int


@dataclass(frozen=True)
class RevocationProgress:
    """How far a revocation got: endpoints it concerns, tightened, and applied by their agents."""

    endpoints: int
    tightened: int
    applied: int
    failed: int


@dataclass(frozen=True)
class PolicyPreviewResult:
    """A dry run: the policy an isolation (or a refresh) now would issue, and what it changes."""

    policy: FrozenPolicy | None
    diff: PolicyDiff
    current_settings_version: int | None


class IsolationService:
    """Applies isolation requests exactly once per request id, and tracks delivery status."""

    def __init__(
        self,
        store: IsolationStore,
        settings: SettingsView,
        registry: Registry,
        publisher: Publisher,
        settings_client: SettingsClient,
        platform: tuple[str, ...],
        clock: Callable[[], datetime] = utcnow,
        *,
        revocations: RevocationLog | None = None,
        usage: UsageStore | None = None,
    ) -> None:
        # None (some unit tests): usage reports are consumed and dropped, views carry none.
        self._usage = usage
        # The composition root always passes the Redis log; None (some unit tests) only skips
        # recording revocations and the snapshot-raced-a-revocation check.
        self._revocations = revocations
        self._store = store
        self._settings = settings
        self._registry = registry
        self._publisher = publisher
        self._settings_client = settings_client
        self._platform = platform
        self._clock = clock

    # -- requests (from Kafka; REST requests arrive here through Kafka too) --

    async def isolate(self, request: IsolateEndpoint) -> RequestOutcome:
        endpoint = await self._known_endpoint(request.endpoint_id)
        await self._authorize(
            request.requested_by, endpoint.account_id, "isolation.isolate", endpoint.endpoint_id
        )
        settings = None
        if request.mode == "standard":
            # Guarantee 2: every allowlist change acknowledged before this request is in Kafka
            # before it; the replica catches up to that offset before the snapshot is taken.
            settings = await self._settings.current(endpoint.account_id)
        else:
            settings = await self._settings.known(endpoint.account_id)
        ctx = self._context(request.requested_by, request.reason)
        outcome = await self._apply(
            endpoint.endpoint_id,
            endpoint.account_id,
            request.request_id,
            request.requested_by,
            "isolation.isolate",
            lambda current: decide_isolation(current, request.mode, ctx, settings),
        )
        await self._enforce_recent_revocations(outcome)
        return outcome

    async def refresh(self, request: RefreshIsolation) -> RequestOutcome:
        """A standard isolation takes the current allowlist (read-your-writes), no release."""
        endpoint = await self._known_endpoint(request.endpoint_id)
        await self._authorize(
            request.requested_by, endpoint.account_id, "isolation.refresh", endpoint.endpoint_id
        )
        settings = await self._settings.current(endpoint.account_id)
        ctx = self._context(request.requested_by, request.reason)
        outcome = await self._apply(
            endpoint.endpoint_id,
            endpoint.account_id,
            request.request_id,
            request.requested_by,
            "isolation.refresh",
            lambda current: decide_refresh(current, ctx, settings),
        )
        await self._enforce_recent_revocations(outcome)
        return outcome

    async def revoke_peer(self, request: RevokeEndpointPeer) -> RequestOutcome:
        """Issue one endpoint its policy without the revoked entry (priority lane)."""
        endpoint = await self._known_endpoint(request.endpoint_id)
        if endpoint.account_id != request.account_id:
            # Guarantee 8: a revocation of one account never touches another's endpoint.
            await self._deny(
                request.requested_by,
                request.account_id,
                request.endpoint_id,
                "isolation.revoke",
                RequestDenied(
                    f"endpoint {request.endpoint_id} does not belong to account "
                    f"{request.account_id}",
                    kind="tenancy",
                ),
            )
        await self._authorize(
            request.requested_by, endpoint.account_id, "isolation.revoke", endpoint.endpoint_id
        )
        revocation = Revocation(
            revocation_id=request.revocation_id,
            account_id=request.account_id,
            entry=request.entry,
            settings_version=request.settings_version,
            reason=request.reason,
            requested_by=request.requested_by,
        )
        return await self._revoke(endpoint.endpoint_id, revocation)

    async def _revoke(self, endpoint_id: str, revocation: Revocation) -> RequestOutcome:
        ctx = self._context(revocation.requested_by, _revoke_reason(revocation))
        return await self._apply(
            endpoint_id,
            revocation.account_id,
            revocation.request_key(endpoint_id),
            revocation.requested_by,
            "isolation.revoke",
            lambda current: decide_revoke(current, revocation, ctx),
        )

    async def revoke_entries(self, event: AllowlistChanged) -> int:
        """Fan a settings version's revocations out: one priority request per affected endpoint.

        The revocation is recorded before the account's endpoints are listed, and every new
        snapshot checks the record after it is stored, so an isolation whose snapshot raced the
        revocation is caught by one side or the other (both: the derived id dedupes it).
        """
        fanned = 0
        for revoked in event.revoked:
            revocation = Revocation(
                revocation_id=revoked.revocation_id,
                account_id=event.account_id,
                entry=revoked.entry,
                settings_version=event.version,
                reason=revoked.reason,
                requested_by=event.changed_by,
            )
            if self._revocations is not None:
                await self._revocations.record(revocation)
            states = await self._store.load_many(
                await self._store.active_endpoints(event.account_id)
            )
            affected = sorted(
                s.endpoint_id
                for s in states
                if s.policy is not None and s.isolated_or_pending and revocation.outdates(s.policy)
            )
            await self._publisher.send_requests(
                "priority", [_revoke_request(revocation, e) for e in affected]
            )
            fanned += len(affected)
            entry = revoked.entry
            await self._publisher.send_audit(
                AuditRecorded(
                    service="isolation",
                    action="isolation.revoke_account",
                    outcome="ok",
                    actor=event.changed_by,
                    account_id=event.account_id,
                    detail=f"revoked {entry.name!r} {entry.address} ({revoked.reason}); "
                    f"tightening {len(affected)} endpoints on the priority lane",
                    after={
                        "revocation_id": revoked.revocation_id,
                        "entry_id": entry.id,
                        "settings_version": event.version,
                        "count": len(affected),
                        "endpoints": affected[:_AUDIT_ENDPOINTS_MAX],
                    },
                )
            )
            log.info(
                "revocation fanned out",
                extra={
                    "account_id": event.account_id,
                    "revocation_id": revoked.revocation_id,
                    "endpoints": len(affected),
                },
            )
        return fanned

    async def _enforce_recent_revocations(self, outcome: RequestOutcome) -> None:
        """A snapshot taken before a revocation reached this instance loses the revoked peer."""
        command = outcome.command
        if command is None or not command.policy.allowed_outbound or self._revocations is None:
            return
        policy = command.policy
        for revocation in await self._revocations.since(policy.account_id, policy.settings_version):
            if revocation.outdates(policy):
                log.warning(
                    "snapshot raced a revocation; tightening at once",
                    extra={
                        "endpoint_id": policy.endpoint_id,
                        "revocation_id": revocation.revocation_id,
                    },
                )
                await self._revoke(policy.endpoint_id, revocation)

    async def release(self, request: ReleaseEndpoint) -> RequestOutcome:
        endpoint = await self._known_endpoint(request.endpoint_id)
        await self._authorize(
            request.requested_by, endpoint.account_id, "isolation.release", endpoint.endpoint_id
        )
        settings = await self._settings.known(endpoint.account_id)
        ctx = self._context(request.requested_by, request.reason)
        return await self._apply(
            endpoint.endpoint_id,
            endpoint.account_id,
            request.request_id,
            request.requested_by,
            "isolation.release",
            lambda current: decide_release(current, ctx, settings),
        )

    async def strict_isolate_account(self, request: StrictIsolateAccount) -> AccountStrictResult:
        """Fan an account-wide strict out into one priority request per endpoint.

        One record handled by one instance cannot tighten 100,000 endpoints within a consumer's
        poll interval, and a crash would redo all of it. Each endpoint's request instead lands on
        that endpoint's priority partition, so the work spreads over partitions and instances.
        The per-endpoint request id is derived from the account request's, so a redelivered
        account request (a crash before its offset was committed) re-sends requests that the
        endpoints' stored outcomes then recognise: no second policy for any endpoint.
        """
        actor = request.requested_by
        await self._authorize(actor, request.account_id, "isolation.strict_account", None)
        # Isolating comes first: a compromised RMM is cut off even if the settings service is
        # down; a failing switch-off raises after this and the redelivery repeats only that.
        endpoints = await self._store.active_endpoints(request.account_id)
        await self._publisher.send_requests(
            "priority",
            [
                IsolateEndpoint(
                    request_id=f"{request.request_id}:{endpoint_id}",
                    endpoint_id=endpoint_id,
                    mode="strict",
                    reason=request.reason,
                    requested_by=actor,
                )
                for endpoint_id in endpoints
            ],
        )
        covered = len(endpoints)
        audit_outcome: Literal["ok", "rejected"] = "ok"
        detail = f"covered {covered} endpoints"
        if request.disable_allowlist:
            try:
                await self._settings_client.disable_allowlist(request.account_id, actor)
            except SettingsRefusedError as exc:
                # The endpoints are strictly isolated already; a refusal is audited, not retried.
                audit_outcome = "rejected"
                detail += f"; allowlist not switched off: {exc}"
                log.error(detail, extra={"account_id": request.account_id})
        await self._publisher.send_audit(
            AuditRecorded(
                service="isolation",
                action="isolation.strict_account",
                outcome=audit_outcome,
                actor=actor,
                account_id=request.account_id,
                detail=detail,
                after={"covered": covered, "disable_allowlist": request.disable_allowlist},
            )
        )
        return AccountStrictResult(covered=covered)

    async def _apply(
        self,
        endpoint_id: str,
        account_id: str,
        request_key: str,
        actor: Actor,
        action: str,
        decide: Callable[[EndpointIsolation], Decision],
    ) -> RequestOutcome:
        # The request's earlier outcome and the endpoint's state are read together (one round
        # trip); the revision check at commit makes the pair safe to act on.
        prior, stored, rev = await self._store.begin(endpoint_id, account_id, request_key)
        if prior is not None:
            return await self._repeat(request_key, prior, actor, action)
        for attempt in range(_MAX_CONFLICT_RETRIES):
            if attempt:
                stored, rev = await self._store.load(endpoint_id)
            current = stored or EndpointIsolation(endpoint_id=endpoint_id, account_id=account_id)
            decision = decide(current)
            if isinstance(decision, RequestDenied):
                await self._deny(actor, account_id, endpoint_id, action, decision)
            outcome = _outcome_of(decision, current, request_key)
            try:
                await self._store.commit(
                    rev,
                    decision.isolation.model_copy(update={"request_ids": (request_key,)})
                    if isinstance(decision, PolicyIssued)
                    else current,
                    changed=isinstance(decision, PolicyIssued),
                    request_key=request_key,
                    outcome=outcome,
                )
            except CommitConflictError:
                continue
            except DuplicateRequest as dup:
                return await self._repeat(request_key, dup.outcome, actor, action)
            await self._send(request_key, outcome, actor, action)
            return outcome
        raise ConcurrentUpdateError(f"endpoint {endpoint_id} changed {_MAX_CONFLICT_RETRIES} times")

    async def _repeat(
        self, request_key: str, outcome: RequestOutcome, actor: Actor, action: str
    ) -> RequestOutcome:
        if outcome.sent or outcome.command is None:
            return outcome
        # The state was stored but the command may never have left (crash in between): send it
        # again. The enforcer fences by sequence, so a second copy of one sequence is harmless.
        log.info(
            "request already applied; sending its command again",
            extra={"endpoint_id": outcome.endpoint_id, "account_id": outcome.account_id},
        )
        await self._send(request_key, outcome, actor, action)
        return outcome

    async def _send(
        self, request_key: str, outcome: RequestOutcome, actor: Actor, action: str
    ) -> None:
        if outcome.command is None or outcome.lane is None:
            return
        policy = outcome.command.policy
        audit = AuditRecorded(
            service="isolation",
            action=action,
            outcome="ok",
            actor=actor,
            account_id=policy.account_id,
            endpoint_id=policy.endpoint_id,
            detail=outcome.detail,
            after={"sequence": policy.sequence, "mode": policy.mode, "policy_id": policy.policy_id},
        )
        # The state event rides with the command: "sent" (and so a redelivery's resend) covers
        # both, so other services hear of every policy issued at least once.
        await self._publisher.send_command(
            outcome.lane, outcome.command, audit, pending_state_of(outcome.command, request_key)
        )
        await self._store.mark_sent(policy.endpoint_id, request_key)
        log.info(
            "policy issued",
            extra={
                "endpoint_id": policy.endpoint_id,
                "account_id": policy.account_id,
                "sequence": policy.sequence,
                "mode": policy.mode,
                "lane": outcome.lane,
            },
        )

    async def _deny(
        self,
        actor: Actor,
        account_id: str,
        endpoint_id: str | None,
        action: str,
        denied: RequestDenied,
    ) -> NoReturn:
        reason = denied.reason
        await self._publisher.send_audit(
            AuditRecorded(
                service="isolation",
                action=action,
                outcome="denied",
                actor=actor,
                account_id=account_id,
                endpoint_id=endpoint_id,
                detail=reason,
            )
        )
        log.warning(
            "request denied",
            extra={"account_id": account_id, "endpoint_id": endpoint_id, "reason": reason},
        )
        if denied.kind == "tenancy":
            raise AccountForbiddenError(reason)
        raise StrictOverrideDeniedError(reason)

    async def _authorize(
        self, actor: Actor, account_id: str, action: str, endpoint_id: str | None
    ) -> None:
        if actor.role in ("soc", "service") or actor.account_id == account_id:
            return
        what = f"endpoint {endpoint_id}" if endpoint_id else f"account {account_id}"
        await self._deny(
            actor,
            account_id,
            endpoint_id,
            action,
            RequestDenied(f"{what} belongs to another account", kind="tenancy"),
        )

    async def _known_endpoint(self, endpoint_id: str) -> EndpointRecord:
        endpoint = await self._registry.get(endpoint_id)
        if endpoint is None:
            raise EndpointNotFoundError(f"endpoint_id: no enrolled endpoint {endpoint_id!r}")
        return endpoint

    def _context(self, actor: Actor, reason: str) -> PolicyContext:
        return PolicyContext(
            policy_id=new_id(),
            now=self._clock(),
            actor=actor,
            reason=reason,
            platform=self._platform,
        )

    # -- agent status --

    async def record_status(self, report: PolicyStatusReported) -> EndpointIsolation | None:
        """Move the endpoint's state on the current sequence's report; None if it did not count."""
        for _ in range(_MAX_CONFLICT_RETRIES):
            current, rev = await self._store.load(report.endpoint_id)
            if current is None:
                raise EndpointNotFoundError(
                    f"endpoint_id: no isolation state for {report.endpoint_id!r}"
                )
            if current.account_id != report.account_id:
                raise AccountForbiddenError(
                    f"account_id: {report.account_id!r} is not the endpoint's account"
                )
            try:
                updated = apply_status(current, report)
            except StatusIgnored as exc:
                log.info(
                    "status ignored: %s",
                    exc,
                    extra={"endpoint_id": report.endpoint_id, "sequence": report.sequence},
                )
                if report.sequence == current.desired_sequence and current.policy is not None:
                    # A redelivered report of the current policy: its state may be stored while
                    # its event was lost in a crash, so the (identical) event goes out again.
                    await self._publisher.send_event(state_changed(current))
                return None
            try:
                await self._store.commit(rev, updated, changed=True)
            except CommitConflictError:
                continue
            await self._publisher.send_event(state_changed(updated))
            log.info(
                "endpoint %s",
                updated.state,
                extra={
                    "endpoint_id": updated.endpoint_id,
                    "account_id": updated.account_id,
                    "sequence": report.sequence,
                },
            )
            return updated
        raise ConcurrentUpdateError(f"endpoint {report.endpoint_id} kept changing")

    # -- allowlist usage (the agent's counters, DESIGN §4) --

    async def record_usage(self, report: AllowlistUsageReported) -> bool:
        """Accumulate the deltas for the endpoint's sequence; True if they counted.

        Only the policy the endpoint holds counts: a report of another sequence than the
        desired one (superseded, or not issued) is dropped, and a newer sequence resets.
        """
        if self._usage is None:
            return False
        current, _ = await self._store.load(report.endpoint_id)
        if current is None:
            raise EndpointNotFoundError(
                f"endpoint_id: no isolation state for {report.endpoint_id!r}"
            )
        if current.account_id != report.account_id:
            raise AccountForbiddenError(
                f"account_id: {report.account_id!r} is not the endpoint's account"
            )
        if report.sequence != current.desired_sequence:
            return False
        return await self._usage.add(report)

    async def usage_of(self, isolation: EndpointIsolation) -> list[AllowlistUsage]:
        """The counters of the policy in force (empty when unknown or of another sequence)."""
        if self._usage is None or isolation.applied_sequence < 1:
            return []
        sequence, counters = await self._usage.usage(isolation.endpoint_id)
        return counters if sequence == isolation.applied_sequence else []

    # -- REST: decide what can be decided up front, then hand the request to Kafka --

    async def submit_isolation(
        self, endpoint_id: str, mode: IsolationMode, reason: str, actor: Actor
    ) -> str:
        current = await self._visible_isolation(endpoint_id, actor, "isolation.isolate")
        request = IsolateEndpoint(
            endpoint_id=endpoint_id, mode=mode, reason=reason, requested_by=actor
        )
        decision = decide_isolation(current, mode, self._context(actor, reason), None)
        if isinstance(decision, RequestDenied):
            await self._deny(actor, current.account_id, endpoint_id, "isolation.isolate", decision)
        await self._publisher.send_request("priority" if mode == "strict" else "normal", request)
        return request.request_id

    async def submit_release(self, endpoint_id: str, reason: str, actor: Actor) -> str:
        current = await self._visible_isolation(endpoint_id, actor, "isolation.release")
        decision = decide_release(current, self._context(actor, reason), None)
        if isinstance(decision, RequestDenied):
            await self._deny(actor, current.account_id, endpoint_id, "isolation.release", decision)
        request = ReleaseEndpoint(endpoint_id=endpoint_id, reason=reason, requested_by=actor)
        # Releasing a strict isolation rides the priority request lane, behind the strict
        # request it undoes (same lane, same key, so Kafka keeps them in order).
        await self._publisher.send_request("priority" if current.strict else "normal", request)
        return request.request_id

    async def submit_account_strict(
        self, account_id: str, reason: str, disable_allowlist: bool, actor: Actor
    ) -> tuple[str, int]:
        await self._authorize(actor, account_id, "isolation.strict_account", None)
        covered = len(await self._store.active_endpoints(account_id))
        request = StrictIsolateAccount(
            account_id=account_id,
            reason=reason,
            disable_allowlist=disable_allowlist,
            requested_by=actor,
        )
        await self._publisher.send_request("priority", request)
        return request.request_id, covered

    async def submit_refresh(self, endpoint_id: str, reason: str, actor: Actor) -> str:
        """Accept a refresh of a standard isolation; RefreshNotAllowedError (409) otherwise."""
        current = await self._visible_isolation(endpoint_id, actor, "isolation.refresh")
        refusal = refresh_refusal(current)
        if refusal is not None:
            raise RefreshNotAllowedError(refusal)
        request = RefreshIsolation(endpoint_id=endpoint_id, reason=reason, requested_by=actor)
        # The normal lane, keyed by endpoint: behind the isolation it refreshes, in order.
        await self._publisher.send_request("normal", request)
        return request.request_id

    async def revocation_progress(
        self, account_id: str, revocation_id: str, target: AllowedPeer, actor: Actor
    ) -> RevocationProgress:
        """Endpoints that still allow ``target`` or were tightened by this revocation."""
        await self._authorize(actor, account_id, "isolation.read", None)
        states = await self._store.load_many(await self._store.active_endpoints(account_id))
        tightened = [s for s in states if f"{revocation_id}:{s.endpoint_id}" in s.request_ids]
        remaining = [s for s in states if s.account_id == account_id and allows_peer(s, target)]
        applied = [
            s
            for s in tightened
            if s.state == "isolated" and s.applied_sequence == s.desired_sequence
        ]
        return RevocationProgress(
            endpoints=len(tightened) + len(remaining),
            tightened=len(tightened),
            applied=len(applied),
            failed=sum(1 for s in tightened if s.state == "failed"),
        )

    async def isolation_of(self, endpoint_id: str, actor: Actor) -> EndpointIsolation:
        return await self._visible_isolation(endpoint_id, actor, "isolation.read")

    async def isolations_of_account(self, account_id: str, actor: Actor) -> list[EndpointIsolation]:
        await self._authorize(actor, account_id, "isolation.read", None)
        states = await self._store.load_many(await self._store.active_endpoints(account_id))
        return [s for s in states if s.isolated_or_pending]

    async def preview(
        self, endpoint_id: str, mode: IsolationMode, actor: Actor
    ) -> PolicyPreviewResult:
        """The policy an isolation now would issue (dry run: nothing is stored or sent).

        For an endpoint in standard isolation that is the policy a refresh would issue; the
        diff is against the policy in force (empty when the endpoint is not isolated).
        """
        current = await self._visible_isolation(endpoint_id, actor, "isolation.preview")
        settings = await self._settings.current(current.account_id)
        ctx = self._context(actor, "preview")
        decision: Decision
        if mode == "standard" and refresh_refusal(current) is None:
            decision = decide_refresh(current, ctx, settings)
        else:
            decision = decide_isolation(current, mode, ctx, settings)
        policy: FrozenPolicy | None = None
        if isinstance(decision, PolicyIssued):
            policy = decision.policy
        elif isinstance(decision, NothingToDo):
            policy = current.policy
        in_force = current.policy if current.isolated_or_pending else None
        return PolicyPreviewResult(
            policy=policy,
            diff=policy_diff(in_force, policy),
            current_settings_version=settings.version if settings is not None else None,
        )

    async def _visible_isolation(
        self, endpoint_id: str, actor: Actor, action: str
    ) -> EndpointIsolation:
        endpoint = await self._known_endpoint(endpoint_id)
        await self._authorize(actor, endpoint.account_id, action, endpoint_id)
        current, _ = await self._store.load(endpoint_id)
        return current if current is not None else fresh_isolation(endpoint)


def _outcome_of(decision: Decision, current: EndpointIsolation, request_key: str) -> RequestOutcome:
    if isinstance(decision, PolicyIssued):
        return RequestOutcome(
            kind="policy",
            endpoint_id=current.endpoint_id,
            account_id=current.account_id,
            detail=", ".join(
                part
                for part in (
                    decision.detail,
                    f"{decision.policy.mode} policy, sequence {decision.policy.sequence}",
                )
                if part
            ),
            lane=decision.lane,
            command=EnforcePolicy(request_id=request_key, policy=decision.policy),
        )
    reason = decision.reason if isinstance(decision, NothingToDo) else "denied"
    return RequestOutcome(
        kind="noop", endpoint_id=current.endpoint_id, account_id=current.account_id, detail=reason
    )


def _revoke_reason(revocation: Revocation) -> str:
    entry = revocation.entry
    why = f": {revocation.reason}" if revocation.reason else ""
    return f"entry {entry.name!r} {entry.address} revoked{why}"[:1000]


def _revoke_request(revocation: Revocation, endpoint_id: str) -> RevokeEndpointPeer:
    return RevokeEndpointPeer(
        request_id=revocation.request_key(endpoint_id),
        endpoint_id=endpoint_id,
        account_id=revocation.account_id,
        revocation_id=revocation.revocation_id,
        entry=revocation.entry,
        settings_version=revocation.settings_version,
        reason=revocation.reason,
        requested_by=revocation.requested_by,
    )
