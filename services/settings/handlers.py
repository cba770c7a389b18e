"""Use cases of the settings service: read and change an account's Tooling Allowlist."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from services.settings import domain
from services.settings.domain import Allowlist, Change, SettingsError
from shared.messages import Actor, AllowlistChanged, AllowlistEntry, AuditRecorded, utcnow

log = logging.getLogger(__name__)


class AllowlistStore(Protocol):
    """Where allowlists, their history and the outbox live (Redis in production)."""

    async def load(self, account_id: str) -> Allowlist: ...

    async def commit(
        self, change: Change, event: AllowlistChanged, audit: AuditRecorded
    ) -> bool: ...

    async def history(
        self, account_id: str, *, limit: int, before_version: int | None = None
    ) -> list[dict[str, Any]]: ...


class Publication(Protocol):
    """Tells when a committed version's event is in Kafka."""

    def wake(self, account_id: str) -> None: ...

    async def wait_published(self, account_id: str, version: int, timeout: float) -> bool: ...


class AuditSink(Protocol):
    """Records refused attempts (best-effort)."""

    async def record(self, audit: AuditRecorded) -> None: ...


class RevocationCounter(Protocol):
    """Asks the isolation service how many endpoints a revocation concerns."""

    async def affected(
        self, account_id: str, revocation_id: str, entry: AllowlistEntry
    ) -> int | None:
        """The count, or None if it cannot be had now (the revocation happens regardless)."""
        ...


class AccountAccessDeniedError(SettingsError):
    """A partner tried to touch another account."""

    field = "account_id"
    rule = "forbidden"


class NotPublishedError(SettingsError):
    """The change is saved but its event is not in Kafka yet (Kafka unreachable or slow)."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"saved as version {version}; will be published when Kafka is reachable; "
            "not yet in force for new isolations"
        )
        self.version = version


class ConcurrentChangeError(SettingsError):
    """The compare-and-set kept losing to other writers."""

    field = "version"
    rule = "contention"

    def __init__(self) -> None:
        super().__init__("the allowlist is changing too fast to apply this change; retry")


Decide = Callable[[Allowlist, datetime], Change | None]

_MAX_CAS_ATTEMPTS = 20


def _actor(principal: Actor) -> Actor:
    return Actor(sub=principal.sub, role=principal.role, account_id=principal.account_id)


class SettingsHandlers:
    """The allowlist use cases, over a store, a publication waiter and an audit sink."""

    def __init__(
        self,
        *,
        store: AllowlistStore,
        publication: Publication,
        audit: AuditSink,
        max_entries: int,
        publish_wait_s: float,
        entry_limits: domain.EntryLimits | None = None,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        revocation_counter: RevocationCounter | None = None,
    ) -> None:
        self._revocation_counter = revocation_counter
        self._store = store
        self._publication = publication
        self._audit = audit
        self._max_entries = max_entries
        self._entry_limits = entry_limits or domain.EntryLimits()
        self._publish_wait_s = publish_wait_s
        self._new_id = new_id

    async def authorize(self, principal: Actor, account_id: str, action: str) -> None:
        """Partners touch only their own account; a refusal is audited (guarantee 8)."""
        if principal.role in ("soc", "service") or principal.account_id == account_id:
            return
        error = AccountAccessDeniedError(
            f"a partner of account {principal.account_id!r} may not access account {account_id!r}"
        )
        log.warning(
            "refused cross-account access",
            extra={"account_id": account_id, "sub": principal.sub, "action": action},
        )
        await self._refused(principal, account_id, action, "denied", error)
        raise error

    async def _refused(
        self, principal: Actor, account_id: str, action: str, outcome: str, error: SettingsError
    ) -> None:
        await self._audit.record(
            AuditRecorded(
                service="settings",
                action=action,
                outcome="denied" if outcome == "denied" else "rejected",
                actor=_actor(principal),
                account_id=account_id,
                detail=f"{error.field}.{error.rule}: {error.message}",
            )
        )

    async def read_allowlist(self, account_id: str) -> Allowlist:
        return await self._store.load(account_id)

    async def history(
        self, account_id: str, *, limit: int, before_version: int | None = None
    ) -> tuple[Allowlist, list[dict[str, Any]], int | None]:
        """One page of records, newest first, and the ``before_version`` of the next page."""
        current = await self._store.load(account_id)
        # One record more than the page tells whether another page follows.
        records = await self._store.history(
            account_id, limit=limit + 1, before_version=before_version
        )
        page = records[:limit]
        more = len(records) > limit
        return current, page, int(page[-1]["version"]) if more else None

    async def set_enabled(
        self, principal: Actor, account_id: str, enabled: bool, if_match: int | None
    ) -> Allowlist:
        action = "allowlist.enable" if enabled else "allowlist.disable"
        after, _ = await self._change(
            principal,
            account_id,
            if_match,
            action,
            lambda current, now: domain.set_enabled(current, enabled, now),
        )
        return after

    async def add_entry(
        self,
        principal: Actor,
        account_id: str,
        name: str,
        address: str,
        if_match: int | None,
        *,
        ports: list[int] | None = None,
        protocol: str | None = None,
        expires_at: str | None = None,
    ) -> tuple[Allowlist, Change | None]:
        entry_id = self._new_id()
        return await self._change(
            principal,
            account_id,
            if_match,
            "allowlist.entry.add",
            lambda current, now: domain.add_entry(
                current,
                name=name,
                address=address,
                entry_id=entry_id,
                created_by=principal.sub,
                now=now,
                max_entries=self._max_entries,
                ports=ports,
                protocol=protocol,
                expires_at=expires_at,
                limits=self._entry_limits,
            ),
        )

    async def update_entry(
        self,
        principal: Actor,
        account_id: str,
        entry_id: str,
        name: str | None,
        address: str | None,
        if_match: int | None,
        *,
        ports: list[int] | None = None,
        protocol: str | None = None,
        expires_at: str | domain.Keep | None = domain.KEEP,
    ) -> tuple[Allowlist, Change | None]:
        return await self._change(
            principal,
            account_id,
            if_match,
            "allowlist.entry.update",
            lambda current, now: domain.update_entry(
                current,
                entry_id,
                name=name,
                address=address,
                now=now,
                ports=ports,
                protocol=protocol,
                expires_at=expires_at,
                limits=self._entry_limits,
            ),
        )

    async def remove_entry(
        self, principal: Actor, account_id: str, entry_id: str, if_match: int | None
    ) -> Allowlist:
        after, _ = await self._change(
            principal,
            account_id,
            if_match,
            "allowlist.entry.remove",
            lambda current, now: domain.remove_entry(current, entry_id, now),
        )
        return after

    async def revoke_entry(
        self, principal: Actor, account_id: str, entry_id: str, reason: str
    ) -> tuple[Allowlist, Change, int | None]:
        """Remove a compromised entry; its event makes isolation cut it everywhere (202).

        Durable first: the entry is gone, the revocation is in the history and its event in
        Kafka before anything is counted. The count asks the isolation service afterwards; it
        counts endpoints still allowing the entry plus those this revocation already tightened,
        so the fan-out racing the question does not change the answer. None: not counted.
        """
        revocation_id = self._new_id()
        after, change = await self._change(
            principal,
            account_id,
            None,
            "allowlist.entry.revoke",
            lambda current, now: domain.revoke_entry(
                current, entry_id, revocation_id=revocation_id, reason=reason, now=now
            ),
        )
        if change is None or change.entry is None:
            raise RuntimeError("a revocation always changes the allowlist")
        endpoints: int | None = None
        if self._revocation_counter is not None:
            endpoints = await self._revocation_counter.affected(
                account_id, revocation_id, change.entry
            )
        return after, change, endpoints

    async def _change(
        self,
        principal: Actor,
        account_id: str,
        if_match: int | None,
        action: str,
        decide: Decide,
    ) -> tuple[Allowlist, Change | None]:
        """Optimistic write: read, decide, compare-and-set; then wait until Kafka has the event.

        Without If-Match a lost race is retried on the fresh state; with If-Match it is a 412
        (exactly one of two writers holding the same version wins).
        """
        for _ in range(_MAX_CAS_ATTEMPTS):
            current = await self._store.load(account_id)
            try:
                domain.check_version(current, if_match)
                change = decide(current, utcnow())
            except domain.EntryNotFoundError:
                raise
            except SettingsError as error:
                await self._refused(principal, account_id, action, "rejected", error)
                raise
            if change is None:
                # Nothing to change; still answer 2xx only once the current state is in Kafka.
                await self._await_published(account_id, current.version)
                return current, None
            actor = _actor(principal)
            event = AllowlistChanged(
                account_id=account_id,
                enabled=change.after.enabled,
                entries=change.after.entries,
                version=change.after.version,
                updated_at=change.after.updated_at or utcnow(),
                changed_by=actor,
                revoked=change.revoked,
            )
            audit = AuditRecorded(
                service="settings",
                action=change.action,
                outcome="ok",
                actor=actor,
                account_id=account_id,
                detail=change.detail,
                before=change.before.summary(),
                after=change.after.summary(),
            )
            if await self._store.commit(change, event, audit):
                log.info(
                    "allowlist changed",
                    extra={
                        "account_id": account_id,
                        "version": change.after.version,
                        "action": change.action,
                        "sub": principal.sub,
                    },
                )
                self._publication.wake(account_id)
                await self._await_published(account_id, change.after.version)
                return change.after, change
            if if_match is not None:
                latest = await self._store.load(account_id)
                stale = domain.StaleVersionError(if_match, latest.version)
                await self._refused(principal, account_id, action, "rejected", stale)
                raise stale
        raise ConcurrentChangeError()

    async def _await_published(self, account_id: str, version: int) -> None:
        if version == 0:
            return
        if not await self._publication.wait_published(account_id, version, self._publish_wait_s):
            log.warning(
                "change saved but not yet published",
                extra={"account_id": account_id, "version": version},
            )
            raise NotPublishedError(version)
