"""Use case: verify a delivered policy, apply it, remember it, and say what to report."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.client import StatusReport
from agent.firewall import HostFirewall
from agent.state import AgentState, StateStore
from agent.verification import PinnedKey, PolicyRefusedError, verify_policy
from shared.messages import SignedPolicy

log = logging.getLogger(__name__)


@dataclass
class AgentStats:
    """Counters of one or many agents in this process."""

    applied: int = 0
    apply_failed: int = 0
    refused: int = 0
    refused_unreportable: int = 0
    poll_errors: int = 0
    # 401/403/404 from the enforcer on a poll or report: an alarm, never a reason to loosen.
    rejected: int = 0
    reports_refused: int = 0
    reenrollments: int = 0
    # Enrollment answers naming another endpoint than ours, or refused re-enrollments.
    enrollment_refused: int = 0
    identity_mismatch: int = 0
    stored_policy_refused: int = 0
    table_restored: int = 0
    by_refusal: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """The report to send for a delivered policy; ``refused`` ones are never applied."""

    report: StatusReport
    refused: bool = False


class PolicyApplier:
    """Verifies signature, endpoint and sequence, applies through the firewall, persists."""

    def __init__(
        self,
        store: StateStore,
        state: AgentState,
        firewall: HostFirewall,
        key: PinnedKey | Sequence[PinnedKey],
        stats: AgentStats,
        *,
        account_id: str,
    ) -> None:
        self.store = store
        self.state = state
        self.firewall = firewall
        # Fixed for the life of the applier: the pinned or configured keys, never a fetched one.
        self.key = key
        self.stats = stats
        self.account_id = account_id
        # False once the stored policy failed verification: the table watchdog must not put an
        # unverified policy back in force.
        self._stored_trusted = True
        firewall.restore_known(state.last_ruleset)

    @property
    def endpoint_id(self) -> str:
        return self.state.agent_id or ""

    def _context(self, signed: SignedPolicy) -> dict[str, object]:
        return {
            "account_id": signed.policy.account_id,
            "endpoint_id": self.endpoint_id,
            "sequence": signed.policy.sequence,
        }

    async def receive(self, signed: SignedPolicy) -> Decision:
        policy = signed.policy
        state = self.state
        last = state.last_policy
        if (
            # The sequence first: a new policy (the usual case) is told apart without
            # comparing the whole signed document.
            policy.sequence == state.last_applied_sequence
            and last is not None
            and self._stored_trusted
            and state.last_rules_sha256 is not None
            and last == signed
        ):
            # Redelivery of what is in force (e.g. our earlier ack was lost): ack again, no re-apply.
            return Decision(
                StatusReport(
                    policy.sequence,
                    policy.policy_id,
                    "applied",
                    state.last_rules_sha256,
                    "already applied",
                )
            )
        try:
            verify_policy(
                signed,
                key=self.key,
                account_id=self.account_id,
                endpoint_id=self.endpoint_id,
                last_applied_sequence=state.fence,
            )
        except PolicyRefusedError as exc:
            self.stats.refused += 1
            self.stats.by_refusal[exc.kind] = self.stats.by_refusal.get(exc.kind, 0) + 1
            log.warning(
                "policy refused: %s",
                exc.reason,
                extra={**self._context(signed), "refusal": exc.kind},
            )
            # Reported against the sequence and policy id the policy claims: that is the only
            # handle the platform has on the delivery that went wrong.
            return Decision(
                StatusReport(
                    policy.sequence, policy.policy_id, "failed", None, f"refused: {exc.reason}"
                ),
                refused=True,
            )
        outcome = await self.firewall.apply(policy, rollback_on_failure=True)
        if outcome.rules_in_force:
            state.last_applied_sequence = policy.sequence
            state.last_policy = signed
            state.last_rules_sha256 = outcome.rules_sha256
            state.last_ruleset = outcome.ruleset if policy.mode != "none" else None
            self._stored_trusted = True
        state.raise_fence(policy.sequence)
        report = StatusReport(
            policy.sequence, policy.policy_id, outcome.status, outcome.rules_sha256, outcome.detail
        )
        # Saved with the outcome: once we poll past this sequence the enforcer will not hand it
        # to us again, so an unsent report must survive a crash and be sent at start.
        state.pending_report = report.to_json()
        await self.store.persist(state)
        if outcome.status == "applied":
            self.stats.applied += 1
            log.info("policy applied (%s)", policy.mode, extra=self._context(signed))
        else:
            self.stats.apply_failed += 1
            log.error("policy failed: %s", outcome.detail, extra=self._context(signed))
        return Decision(report)

    async def reapply_last(self) -> None:
        """At start: put the last verified policy back in force (rules do not survive a reboot)."""
        signed = self.state.last_policy
        if signed is None:
            return
        try:
            verify_policy(
                signed,
                key=self.key,
                account_id=self.account_id,
                endpoint_id=self.endpoint_id,
                last_applied_sequence=signed.policy.sequence - 1,
            )
        except PolicyRefusedError as exc:
            # The state file was altered (or its key is no longer configured). Fail closed: do
            # not apply it, but do not forget the fence either, nor touch the rules in force
            # (an isolated host's table survives an agent restart); only a newer verified
            # policy changes anything.
            log.error(
                "ALARM stored policy refused; not re-applied, rules in force and fence %d kept: %s",
                self.state.fence,
                exc.reason,
                extra={**self._context(signed), "alarm": "stored_policy_refused"},
            )
            self.stats.stored_policy_refused += 1
            self._stored_trusted = False
            return
        # No rollback at start: the network may simply not be up yet, and un-isolating an
        # isolated host because of that would be the wrong way round.
        outcome = await self.firewall.apply(signed.policy, rollback_on_failure=False)
        log.info("re-applied stored policy: %s", outcome.detail, extra=self._context(signed))

    async def ensure_table(self) -> bool:
        """Re-apply if our table vanished (nftables.service flush, manual delete); True if it did."""
        signed = self.state.last_policy
        if signed is None or signed.policy.mode == "none" or not self._stored_trusted:
            return False
        if await self.firewall.table_present():
            return False
        log.warning("nftables table missing, re-applying", extra=self._context(signed))
        self.stats.table_restored += 1
        await self.firewall.apply(signed.policy, rollback_on_failure=False)
        return True
