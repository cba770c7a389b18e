"""Thin Kafka handlers: the request lanes and the agents' status reports."""

from __future__ import annotations

from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter

from services.isolation.handlers import (
    AccountForbiddenError,
    EndpointNotFoundError,
    IsolationService,
    StrictOverrideDeniedError,
)
from shared.kafka import MessageRejected
from shared.messages import (
    AllowlistChanged,
    AllowlistUsageReported,
    IsolateEndpoint,
    PolicyStatusReported,
    RefreshIsolation,
    ReleaseEndpoint,
    RevokeEndpointPeer,
    StrictIsolateAccount,
)

IsolationRequestMessage = (
    IsolateEndpoint | ReleaseEndpoint | StrictIsolateAccount | RevokeEndpointPeer | RefreshIsolation
)


class IsolationConsumers:
    """Turns each consumed message into one use-case call; refusals become DLQ records.

    Any other error propagates so TypedConsumer rewinds and retries the record: offsets are
    committed only after the state is stored and the command acknowledged (at-least-once).
    """

    def __init__(self, service: IsolationService, registry: CollectorRegistry) -> None:
        self._service = service
        self._requests = Counter(
            "hostiso_isolation_requests_total",
            "Isolation requests consumed, by lane and outcome",
            ["lane", "outcome"],
            registry=registry,
        )
        self._revocations = Counter(
            "hostiso_isolation_revoke_requests_total",
            "Per-endpoint revoke requests fanned out from revoked allowlist entries",
            registry=registry,
        )
        self._statuses = Counter(
            "hostiso_isolation_status_reports_total",
            "Agent status reports consumed, by effect",
            ["effect"],
            registry=registry,
        )

    async def on_normal_request(
        self,
        message: IsolationRequestMessage,
        record: ConsumerRecord[bytes, bytes],
    ) -> None:
        await self._on_request("normal", message)

    async def on_priority_request(
        self,
        message: IsolationRequestMessage,
        record: ConsumerRecord[bytes, bytes],
    ) -> None:
        await self._on_request("priority", message)

    async def _on_request(self, lane: str, message: IsolationRequestMessage) -> None:
        try:
            if isinstance(message, IsolateEndpoint):
                outcome = (await self._service.isolate(message)).kind
            elif isinstance(message, ReleaseEndpoint):
                outcome = (await self._service.release(message)).kind
            elif isinstance(message, RevokeEndpointPeer):
                outcome = (await self._service.revoke_peer(message)).kind
            elif isinstance(message, RefreshIsolation):
                outcome = (await self._service.refresh(message)).kind
            else:
                await self._service.strict_isolate_account(message)
                outcome = "policy"
        except (EndpointNotFoundError, AccountForbiddenError, StrictOverrideDeniedError) as exc:
            self._requests.labels(lane, "rejected").inc()
            raise MessageRejected(f"{type(exc).__name__}: {exc}") from exc
        self._requests.labels(lane, outcome).inc()

    async def on_allowlist_changed(
        self, event: AllowlistChanged, record: ConsumerRecord[bytes, bytes]
    ) -> None:
        """Revocations fan out; every other allowlist change leaves isolated endpoints alone.

        Guarantee 3: only a revocation touches a policy already issued, and only to remove.
        """
        if event.revoked:
            fanned = await self._service.revoke_entries(event)
            self._revocations.inc(fanned)

    async def on_status(
        self,
        report: PolicyStatusReported | AllowlistUsageReported,
        record: ConsumerRecord[bytes, bytes],
    ) -> None:
        if isinstance(report, AllowlistUsageReported):
            try:
                counted = await self._service.record_usage(report)
            except (EndpointNotFoundError, AccountForbiddenError) as exc:
                self._statuses.labels("usage_rejected").inc()
                raise MessageRejected(f"{type(exc).__name__}: {exc}") from exc
            self._statuses.labels("usage" if counted else "usage_ignored").inc()
            return
        try:
            updated = await self._service.record_status(report)
        except (EndpointNotFoundError, AccountForbiddenError) as exc:
            self._statuses.labels("rejected").inc()
            raise MessageRejected(f"{type(exc).__name__}: {exc}") from exc
        self._statuses.labels("ignored" if updated is None else updated.state).inc()
