"""The agent's long-running work: enroll, re-apply, long-poll, report, watch the table."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.applier import AgentStats, PolicyApplier
from agent.client import (
    AgentRejectedError,
    EnforcerClient,
    EnforcerUnavailableError,
    Enrollment,
    EnrollmentRefusedError,
    ReportRefusedError,
    StatusReport,
    UnreadablePolicyError,
    UsageRefusedError,
)
from agent.firewall import HostFirewall, NftablesError, UsageSource
from agent.state import StateStore
from agent.usage import UsageTracker
from agent.verification import PinnedKey, SigningKeyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentIdentity:
    """What the agent enrolls as."""

    account_id: str
    hostname: str
    platform: str


# A Retry-After (503/429) is honoured within [floor, the backoff's cap]: a peer can neither
# stall an agent for ever nor, with "Retry-After: 0", make it retry at once.
RETRY_AFTER_FLOOR_S = 0.5
# Up to this fraction is added to a honoured Retry-After, so a fleet told "1" does not come back
# in the same millisecond.
RETRY_AFTER_JITTER = 0.25


class Backoff:
    """Exponential backoff with full jitter; the wait ends early when ``stop`` is set."""

    def __init__(self, stop: asyncio.Event, base: float = 0.5, cap: float = 30.0) -> None:
        self.stop = stop
        self.base = base
        self.cap = cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def delay(self, retry_after: float | None = None) -> float:
        """The next wait (and counts the attempt). ``retry_after``: what the peer asked for; it
        may lengthen the wait, never shorten it below the backoff's own, and is bounded to
        ``[RETRY_AFTER_FLOOR_S, cap]`` (plus up to ``RETRY_AFTER_JITTER``, still under cap)."""
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        if retry_after is not None and retry_after == retry_after:  # not NaN
            asked = min(self.cap, max(RETRY_AFTER_FLOOR_S, retry_after))
            asked = min(self.cap, asked * random.uniform(1.0, 1.0 + RETRY_AFTER_JITTER))
            delay = max(delay, asked)
        return delay

    async def wait(self, retry_after: float | None = None) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), self.delay(retry_after))
        except TimeoutError:
            return


def retry_after_of(exc: BaseException) -> float | None:
    return exc.retry_after if isinstance(exc, EnforcerUnavailableError) else None


EnrollmentKeySource = Callable[[], Awaitable[str]]


class AgentStoppedError(Exception):
    """The agent was asked to stop before it could enroll."""


class NoTrustedKeyError(Exception):
    """No signing key configured, and pinning one from the network is only allowed in dev mode."""


# Consecutive 401/403/404 answers before the agent tries to enroll again as the same endpoint.
REENROLL_AFTER = 5
# Distinct refusals remembered so each is reported once; bounded against a peer inventing them.
_REMEMBERED_REFUSALS = 1024


class AgentLoop:
    """One agent: its state, its applier, its poll loop.

    Fails closed (DESIGN.md §6, guarantee 11): nothing a network peer answers (401/403/404/5xx,
    silence, another key, a forged enrollment) changes the rules in force, the trusted key, the
    endpoint id or the sequence fence. Only a verified newer policy does.
    """

    def __init__(
        self,
        *,
        identity: AgentIdentity,
        client: EnforcerClient,
        store: StateStore,
        firewall: HostFirewall,
        enrollment_key: EnrollmentKeySource,
        stats: AgentStats,
        configured_key: PinnedKey | Sequence[PinnedKey] | None = None,
        dev_mode: bool = False,
        poll_wait: float = 25.0,
        table_check_interval: float | None = 30.0,
        backoff_cap: float = 30.0,
        reenroll_after: int = REENROLL_AFTER,
        usage_interval: float | None = 60.0,
    ) -> None:
        # Seconds between usage reports while isolated (None or 0: never; DESIGN §4).
        self.usage_interval = usage_interval
        self.usage = UsageTracker()
        self.identity = identity
        self.client = client
        self.store = store
        self.firewall = firewall
        self.enrollment_key = enrollment_key
        self.stats = stats
        self.configured_keys: tuple[PinnedKey, ...] | None = (
            None
            if configured_key is None
            else (configured_key,)
            if isinstance(configured_key, PinnedKey)
            else tuple(configured_key)
        )
        self.dev_mode = dev_mode
        self.poll_wait = poll_wait
        self.table_check_interval = table_check_interval
        self.backoff_cap = backoff_cap
        self.reenroll_after = reenroll_after
        self.state = store.load()
        self.applier: PolicyApplier | None = None
        self._reported_refusals: set[tuple[int, str, str]] = set()

    @property
    def enrollment(self) -> Enrollment | None:
        if self.state.agent_id and self.state.agent_token:
            return Enrollment(self.state.agent_id, self.state.agent_token)
        return None

    def _context(self) -> dict[str, object]:
        return {"account_id": self.identity.account_id, "endpoint_id": self.state.agent_id}

    async def _enroll(self, stop: asyncio.Event) -> Enrollment:
        """The first enrollment of this host; pins the key in dev mode when none is configured."""
        backoff = Backoff(stop, cap=self.backoff_cap)
        while True:
            try:
                if self.configured_keys is None and self.state.signing_key is None:
                    if not self.dev_mode:
                        raise NoTrustedKeyError(
                            "no signing public key configured (--signing-public-key); only dev"
                            " mode may pin one from the enforcer"
                        )
                    # Dev mode: trust on first use, once. Never replaced afterwards.
                    PinnedKey.from_base64(fetched := await self.client.signing_key())
                    self.state.signing_key = fetched
                enrolled = await self.client.enroll(
                    account_id=self.identity.account_id,
                    enrollment_key=await self.enrollment_key(),
                    hostname=self.identity.hostname,
                    platform=self.identity.platform,
                )
            except (EnforcerUnavailableError, SigningKeyError) as exc:
                self.stats.poll_errors += 1
                log.warning("enrollment: enforcer unavailable: %s", exc)
                await backoff.wait(retry_after_of(exc))
                if stop.is_set():
                    raise AgentStoppedError("stopped before enrollment") from exc
                continue
            self.state.agent_id = enrolled.agent_id
            self.state.agent_token = enrolled.agent_token
            await self.store.persist(self.state)
            log.info(
                "enrolled",
                extra={"account_id": self.identity.account_id, "endpoint_id": enrolled.agent_id},
            )
            return enrolled

    async def _reenroll(self, current: Enrollment) -> Enrollment:
        """Enroll again as the endpoint we are; anything else keeps ``current`` and alarms.

        The key and the fence are never touched here. The enrollment key goes only where the
        first one went (verified https, or plain http in dev mode: the client refuses otherwise).
        """
        context = self._context()
        try:
            key = await self.enrollment_key()
        except (OSError, ValueError) as exc:
            # E.g. the key file removed while rotating it: try again after the next rejections.
            self.stats.enrollment_refused += 1
            log.error(
                "ALARM re-enrollment: no enrollment key (%s); rules in force kept",
                exc,
                extra={**context, "alarm": "enrollment_refused"},
            )
            return current
        try:
            enrolled = await self.client.enroll(
                account_id=self.identity.account_id,
                enrollment_key=key,
                hostname=self.identity.hostname,
                platform=self.identity.platform,
                endpoint_id=current.agent_id,
            )
        except EnforcerUnavailableError as exc:
            self.stats.poll_errors += 1
            log.warning("re-enrollment: enforcer unavailable: %s", exc, extra=context)
            return current
        except EnrollmentRefusedError as exc:
            self.stats.enrollment_refused += 1
            log.error(
                "ALARM re-enrollment refused (%s); rules in force kept, still polling",
                exc,
                extra={**context, "alarm": "enrollment_refused"},
            )
            return current
        if enrolled.agent_id != current.agent_id:
            self.stats.identity_mismatch += 1
            log.error(
                "ALARM enrollment answer names endpoint %r, this agent is %r: refused; rules"
                " in force, key and fence kept",
                enrolled.agent_id,
                current.agent_id,
                extra={**context, "alarm": "identity_mismatch"},
            )
            return current
        self.stats.reenrollments += 1
        self.state.agent_token = enrolled.agent_token
        await self.store.persist(self.state)
        log.warning(
            "re-enrolled as the same endpoint; fence %d kept", self.state.fence, extra=context
        )
        return enrolled

    def _trusted_keys(self) -> tuple[PinnedKey, ...]:
        if self.configured_keys is not None:
            return self.configured_keys
        if self.state.signing_key is None:
            raise NoTrustedKeyError("no signing public key configured and none pinned")
        return (PinnedKey.from_base64(self.state.signing_key),)

    async def start(self, stop: asyncio.Event) -> Enrollment:
        """Enroll if needed and put the last verified policy back in force."""
        enrollment = self.enrollment
        if enrollment is None:
            enrollment = await self._enroll(stop)
        self.applier = PolicyApplier(
            self.store,
            self.state,
            self.firewall,
            self._trusted_keys(),
            self.stats,
            account_id=self.identity.account_id,
        )
        await self.applier.reapply_last()
        return enrollment

    async def run(self, stop: asyncio.Event) -> None:
        enrollment = await self.start(stop)
        watchdog: asyncio.Task[None] | None = None
        if self.table_check_interval:
            watchdog = asyncio.create_task(self._watch_table(stop, self.table_check_interval))
        counting: asyncio.Task[None] | None = None
        if self.usage_interval and isinstance(self.firewall, UsageSource):
            counting = asyncio.create_task(
                self._count_usage(stop, self.firewall, self.usage_interval)
            )
        try:
            await self._send_pending(stop, enrollment)
            await self._poll_loop(stop, enrollment)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if counting is not None:
                counting.cancel()
            self.store.flush()

    async def _send_pending(self, stop: asyncio.Event, enrollment: Enrollment) -> None:
        if self.state.pending_report is not None:
            await self._report(stop, enrollment, StatusReport.from_json(self.state.pending_report))

    async def _poll_loop(self, stop: asyncio.Event, enrollment: Enrollment) -> None:
        # One waiter on ``stop`` for the whole loop, not one per poll: thousands of simulated
        # agents poll in one process, and a task made and cancelled per poll is CPU for nothing.
        stopping = asyncio.create_task(stop.wait())
        try:
            await self._polls(stop, stopping, enrollment)
        finally:
            stopping.cancel()

    async def _polls(
        self, stop: asyncio.Event, stopping: asyncio.Task[Literal[True]], enrollment: Enrollment
    ) -> None:
        applier = self.applier
        assert applier is not None
        backoff = Backoff(stop, cap=self.backoff_cap)
        context = self._context()
        rejections = 0
        # The poll runs in this task (no task and no asyncio.wait per poll): ``stop`` during a
        # poll cancels this task, and only that cancellation is taken back here.
        me = asyncio.current_task()
        assert me is not None
        polling = stopped_poll = False

        def stop_polling(_: object) -> None:
            nonlocal stopped_poll
            if polling:
                stopped_poll = True
                me.cancel()

        stopping.add_done_callback(stop_polling)
        while not stop.is_set():
            failure: Exception | None = None
            polling = True
            try:
                signed = await self.client.poll_policy(
                    enrollment, after=self.state.poll_cursor, wait=self.poll_wait
                )
            except asyncio.CancelledError:
                # Ours (stop_polling) is taken back; anyone else's goes on up.
                if stopped_poll and me.uncancel() == 0:
                    return
                raise
            except (EnforcerUnavailableError, AgentRejectedError, UnreadablePolicyError) as exc:
                signed, failure = None, exc
            finally:
                polling = False
            if isinstance(failure, EnforcerUnavailableError):
                self.stats.poll_errors += 1
                log.warning("poll failed, rules in force kept: %s", failure, extra=context)
                await backoff.wait(failure.retry_after)
                continue
            if isinstance(failure, AgentRejectedError):
                # Anyone on the path can answer 401: never a reason to forget anything.
                self.stats.rejected += 1
                rejections += 1
                log.error(
                    "ALARM enforcer rejected this agent (%s, %d in a row); rules in force,"
                    " key and fence kept",
                    failure,
                    rejections,
                    extra={**context, "alarm": "rejected", "status": failure.status},
                )
                if rejections >= self.reenroll_after and (
                    self.client.verified_channel or self.dev_mode
                ):
                    rejections = 0
                    enrollment = await self._reenroll(enrollment)
                await backoff.wait()
                continue
            if failure is not None:  # UnreadablePolicyError
                # Nothing in the body can be trusted, not even the sequence to report against.
                self.stats.refused_unreportable += 1
                log.error("unreadable policy refused: %s", failure, extra=context)
                await backoff.wait()
                continue
            rejections = 0
            # A report the enforcer rejected earlier goes again once it answers us properly.
            await self._send_pending(stop, enrollment)
            if signed is None:
                backoff.reset()
                continue
            decision = await applier.receive(signed)
            if decision.refused:
                key = (decision.report.sequence, decision.report.policy_id, decision.report.detail)
                if key not in self._reported_refusals:
                    if len(self._reported_refusals) >= _REMEMBERED_REFUSALS:
                        self._reported_refusals.clear()
                    self._reported_refusals.add(key)
                    await self._report(stop, enrollment, decision.report)
                # The enforcer would hand us the same policy again at once: do not spin on it.
                await backoff.wait()
                continue
            backoff.reset()
            await self._report(stop, enrollment, decision.report)

    async def _report(
        self, stop: asyncio.Event, enrollment: Enrollment, report: StatusReport
    ) -> None:
        backoff = Backoff(stop, cap=self.backoff_cap)
        context = {**self._context(), "sequence": report.sequence}
        while not stop.is_set():
            try:
                await self.client.report(enrollment, report)
                await self._sent(report)
                return
            except EnforcerUnavailableError as exc:
                log.warning("status report failed, retrying: %s", exc, extra=context)
                await backoff.wait(exc.retry_after)
            except AgentRejectedError as exc:
                # Kept pending (if it was): sent again after the next properly answered poll.
                self.stats.rejected += 1
                log.error(
                    "ALARM status report rejected: %s",
                    exc,
                    extra={**context, "alarm": "rejected", "status": exc.status},
                )
                return
            except ReportRefusedError as exc:
                self.stats.reports_refused += 1
                log.error("status report refused: %s", exc, extra=context)
                await self._sent(report)
                return
        self.stats.reports_refused += 1

    async def _sent(self, report: StatusReport) -> None:
        if self.state.pending_report == report.to_json():
            self.state.pending_report = None
            await self.store.persist_lazily(self.state)

    async def _watch_table(self, stop: asyncio.Event, interval: float) -> None:
        applier = self.applier
        assert applier is not None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                await applier.ensure_table()

    async def _count_usage(self, stop: asyncio.Event, source: UsageSource, interval: float) -> None:
        """Every ``interval`` seconds while isolated: read the counters, report the deltas.

        A failure to read or to report is logged and retried at the next tick; it never
        touches the rules in force (fail closed). A new policy's first tick reports every entry
        (zeros included); later ticks only entries whose counts rose."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
                return
            except TimeoutError:
                pass
            await self.report_usage_once(source)

    async def report_usage_once(self, source: UsageSource) -> bool:
        """One read and report; True if a report was taken by the enforcer."""
        enrollment = self.enrollment
        context = self._context()
        try:
            reading = await source.read_usage()
        except NftablesError as exc:
            log.warning("usage counters unreadable, retrying later: %s", exc, extra=context)
            return False
        if reading is None or enrollment is None:
            return False
        self.usage.observe(reading)
        body = self.usage.body()
        if body is None:
            return False
        try:
            await self.client.report_usage(enrollment, body)
        except (EnforcerUnavailableError, AgentRejectedError) as exc:
            log.warning("usage report failed, kept for the next one: %s", exc, extra=context)
            return False
        except UsageRefusedError as exc:
            # 409: a newer policy is held; its counters start from zero at the next apply.
            log.warning("usage report refused, dropped: %s", exc, extra=context)
            self.usage.sent(body)
            return False
        self.usage.sent(body)
        return True
