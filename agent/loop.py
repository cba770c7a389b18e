"""The agent's long-running work: enroll, re-apply, long-poll, report, watch the table."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.applier import AgentStats, PolicyApplier
from agent.client import (
    AgentUnknownError,
    EnforcerClient,
    EnforcerUnavailableError,
    Enrollment,
    ReportRefusedError,
    StatusReport,
    UnreadablePolicyError,
)
from agent.firewall import HostFirewall
from agent.state import StateStore
from agent.verification import PinnedKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentIdentity:
    """What the agent enrolls as."""

    account_id: str
    hostname: str
    platform: str


class Backoff:
    """Exponential backoff with full jitter; the wait ends early when ``stop`` is set."""

    def __init__(self, stop: asyncio.Event, base: float = 0.5, cap: float = 30.0) -> None:
        self.stop = stop
        self.base = base
        self.cap = cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    async def wait(self) -> None:
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        try:
            await asyncio.wait_for(self.stop.wait(), delay)
        except TimeoutError:
            return


EnrollmentKeySource = Callable[[], Awaitable[str]]


class AgentStoppedError(Exception):
    """The agent was asked to stop before it could enroll."""


class AgentLoop:
    """One agent: its state, its applier, its poll loop."""

    def __init__(
        self,
        *,
        identity: AgentIdentity,
        client: EnforcerClient,
        store: StateStore,
        firewall: HostFirewall,
        enrollment_key: EnrollmentKeySource,
        stats: AgentStats,
        configured_key: PinnedKey | None = None,
        poll_wait: float = 25.0,
        table_check_interval: float | None = 30.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self.identity = identity
        self.client = client
        self.store = store
        self.firewall = firewall
        self.enrollment_key = enrollment_key
        self.stats = stats
        self.configured_key = configured_key
        self.poll_wait = poll_wait
        self.table_check_interval = table_check_interval
        self.backoff_cap = backoff_cap
        self.state = store.load()
        self.applier: PolicyApplier | None = None
        self._reported_refusals: set[tuple[int, str, str]] = set()

    @property
    def enrollment(self) -> Enrollment | None:
        if self.state.agent_id and self.state.agent_token:
            return Enrollment(self.state.agent_id, self.state.agent_token)
        return None

    async def _enroll(self, stop: asyncio.Event, *, repin: bool = False) -> Enrollment:
        backoff = Backoff(stop, cap=self.backoff_cap)
        while True:
            try:
                if self.configured_key is None and (repin or self.state.signing_key is None):
                    # Trust on first use, pinned with the enrollment. A new enrollment (the
                    # enforcer lost ours) is a new identity and pins afresh; deployments that
                    # must not trust the network here pass --signing-public-key.
                    self.state.signing_key = await self.client.signing_key()
                enrolled = await self.client.enroll(
                    account_id=self.identity.account_id,
                    enrollment_key=await self.enrollment_key(),
                    hostname=self.identity.hostname,
                    platform=self.identity.platform,
                )
            except EnforcerUnavailableError as exc:
                self.stats.poll_errors += 1
                log.warning("enrollment: enforcer unavailable: %s", exc)
                await backoff.wait()
                if stop.is_set():
                    raise AgentStoppedError("stopped before enrollment") from exc
                continue
            if self.state.agent_id != enrolled.agent_id:
                # A new agent id is a new endpoint with its own sequence numbers; the rules in
                # force stay until that endpoint gets a policy.
                self.state.last_applied_sequence = 0
                self.state.poll_cursor = 0
            self.state.agent_id = enrolled.agent_id
            self.state.agent_token = enrolled.agent_token
            await self.store.persist(self.state)
            log.info(
                "enrolled",
                extra={"account_id": self.identity.account_id, "endpoint_id": enrolled.agent_id},
            )
            return enrolled

    def _pinned_key(self) -> PinnedKey:
        if self.configured_key is not None:
            return self.configured_key
        assert self.state.signing_key is not None, "enrollment pins the key"
        return PinnedKey.from_base64(self.state.signing_key)

    async def start(self, stop: asyncio.Event) -> Enrollment:
        """Enroll if needed and put the last verified policy back in force."""
        enrollment = self.enrollment
        if enrollment is None or (self.configured_key is None and self.state.signing_key is None):
            enrollment = await self._enroll(stop)
        self.applier = PolicyApplier(
            self.store, self.state, self.firewall, self._pinned_key(), self.stats
        )
        await self.applier.reapply_last()
        return enrollment

    async def run(self, stop: asyncio.Event) -> None:
        enrollment = await self.start(stop)
        watchdog: asyncio.Task[None] | None = None
        if self.table_check_interval:
            watchdog = asyncio.create_task(self._watch_table(stop, self.table_check_interval))
        try:
            if self.state.pending_report is not None:
                pending = StatusReport.from_json(self.state.pending_report)
                await self._report(stop, enrollment, pending)
            await self._poll_loop(stop, enrollment)
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _poll_loop(self, stop: asyncio.Event, enrollment: Enrollment) -> None:
        applier = self.applier
        assert applier is not None
        backoff = Backoff(stop, cap=self.backoff_cap)
        context = {"account_id": self.identity.account_id, "endpoint_id": enrollment.agent_id}
        while not stop.is_set():
            poll = asyncio.create_task(
                self.client.poll_policy(
                    enrollment, after=self.state.poll_cursor, wait=self.poll_wait
                )
            )
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({poll, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if poll not in done:
                poll.cancel()
                return
            stopping.cancel()
            try:
                signed = poll.result()
            except EnforcerUnavailableError as exc:
                self.stats.poll_errors += 1
                log.warning("poll failed: %s", exc, extra=context)
                await backoff.wait()
                continue
            except AgentUnknownError as exc:
                log.warning(
                    "enforcer no longer knows this agent (%s); enrolling again", exc, extra=context
                )
                enrollment = await self._enroll(stop, repin=True)
                applier.key = self._pinned_key()
                context["endpoint_id"] = enrollment.agent_id
                continue
            except UnreadablePolicyError as exc:
                # Nothing in the body can be trusted, not even the sequence to report against.
                self.stats.refused_unreportable += 1
                log.error("unreadable policy refused: %s", exc, extra=context)
                await backoff.wait()
                continue
            if signed is None:
                backoff.reset()
                continue
            decision = await applier.receive(signed)
            if decision.refused:
                key = (decision.report.sequence, decision.report.policy_id, decision.report.detail)
                if key not in self._reported_refusals:
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
        context = {
            "account_id": self.identity.account_id,
            "endpoint_id": enrollment.agent_id,
            "sequence": report.sequence,
        }
        while not stop.is_set():
            try:
                await self.client.report(enrollment, report)
                await self._sent(report)
                return
            except EnforcerUnavailableError as exc:
                log.warning("status report failed, retrying: %s", exc, extra=context)
                await backoff.wait()
            except (ReportRefusedError, AgentUnknownError) as exc:
                self.stats.reports_refused += 1
                log.error("status report refused: %s", exc, extra=context)
                await self._sent(report)
                return
        self.stats.reports_refused += 1

    async def _sent(self, report: StatusReport) -> None:
        if self.state.pending_report == report.to_json():
            self.state.pending_report = None
            await self.store.persist(self.state)

    async def _watch_table(self, stop: asyncio.Event, interval: float) -> None:
        applier = self.applier
        assert applier is not None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                await applier.ensure_table()
