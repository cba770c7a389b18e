from pathlib import Path

import pytest

from agent.addresses import HostFacts
from agent.applier import AgentStats, PolicyApplier
from agent.firewall import ApplyOutcome, SimulatedFirewall
from agent.nft import render_ruleset, rules_sha256
from agent.state import AgentState, StateStore
from agent.verification import PinnedKey
from shared.messages import FrozenPolicy
from tests.unit.agent.policies import TestSigner, make_policy

FACTS = HostFacts(platform_addresses=(), dns_resolvers=("192.0.2.53",))


class RecordingFirewall(SimulatedFirewall):
    """Simulated firewall that records what it applied and can be told to fail."""

    def __init__(self) -> None:
        super().__init__(FACTS, "hostiso")
        self.applied: list[tuple[int, bool]] = []
        self.fail_with: str | None = None
        self.present = True
        self.known: str | None = None

    async def apply(self, policy: FrozenPolicy, *, rollback_on_failure: bool) -> ApplyOutcome:
        self.applied.append((policy.sequence, rollback_on_failure))
        if self.fail_with:
            return ApplyOutcome("failed", None, self.fail_with, rules_in_force=False)
        self.present = policy.mode != "none"
        return await super().apply(policy, rollback_on_failure=rollback_on_failure)

    async def table_present(self) -> bool:
        return self.present

    def restore_known(self, ruleset: str | None) -> None:
        self.known = ruleset


@pytest.fixture
def signer() -> TestSigner:
    return TestSigner()


def _applier(tmp_path: Path, signer: TestSigner, firewall: RecordingFirewall) -> PolicyApplier:
    store = StateStore(tmp_path)
    state = store.load()
    state.agent_id, state.agent_token = "ep-1", "tok-1"
    return PolicyApplier(
        store,
        state,
        firewall,
        PinnedKey.from_base64(signer.public_b64),
        AgentStats(),
        account_id="acct-1",
    )


async def test_verified_policy_is_applied_persisted_and_acked_with_rules_hash(
    tmp_path: Path, signer: TestSigner
) -> None:
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    signed = signer.sign(make_policy(sequence=3))
    decision = await applier.receive(signed)
    assert decision.report.status == "applied" and not decision.refused
    assert decision.report.rules_sha256 == rules_sha256(render_ruleset(signed.policy, FACTS))
    stored = StateStore(tmp_path).load()
    assert stored.last_applied_sequence == 3 and stored.last_policy == signed
    assert stored.poll_cursor == 3


@pytest.mark.parametrize("case", ["tampered", "other-endpoint", "older"])
async def test_refused_policy_is_not_applied_and_reported_against_its_claimed_sequence(
    tmp_path: Path, signer: TestSigner, case: str
) -> None:
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    await applier.receive(signer.sign(make_policy(sequence=5)))
    if case == "tampered":
        good = signer.sign(make_policy(sequence=6, mode="strict"))
        bad = good.model_copy(update={"policy": make_policy(sequence=6, allowed=("192.0.2.99",))})
    elif case == "other-endpoint":
        bad = signer.sign(make_policy(sequence=6, endpoint_id="ep-2"))
    else:
        bad = signer.sign(make_policy(sequence=4, mode="none"))
    decision = await applier.receive(bad)
    assert decision.refused
    assert decision.report.status == "failed"
    assert decision.report.sequence == bad.policy.sequence
    assert decision.report.detail.startswith("refused: ")
    assert [seq for seq, _ in firewall.applied] == [5]
    assert StateStore(tmp_path).load().last_applied_sequence == 5


async def test_redelivery_of_the_policy_in_force_is_acked_again_without_reapplying(
    tmp_path: Path, signer: TestSigner
) -> None:
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    signed = signer.sign(make_policy(sequence=2))
    first = await applier.receive(signed)
    again = await applier.receive(signed)
    assert again.report.status == "applied" and not again.refused
    assert again.report.rules_sha256 == first.report.rules_sha256
    assert len(firewall.applied) == 1


async def test_another_policy_with_the_sequence_in_force_is_refused_not_acked(
    tmp_path: Path, signer: TestSigner
) -> None:
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    await applier.receive(signer.sign(make_policy(sequence=2)))
    other = signer.sign(make_policy(sequence=2, mode="none"))
    decision = await applier.receive(other)
    assert decision.refused and "not above" in decision.report.detail
    assert len(firewall.applied) == 1


async def test_failed_apply_moves_the_poll_cursor_but_not_the_fence(
    tmp_path: Path, signer: TestSigner
) -> None:
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    await applier.receive(signer.sign(make_policy(sequence=1)))
    firewall.fail_with = "positive check failed: platform unreachable; rolled back"
    decision = await applier.receive(signer.sign(make_policy(sequence=2, mode="strict")))
    assert decision.report.status == "failed"
    assert "positive check" in decision.report.detail
    state = StateStore(tmp_path).load()
    assert (state.last_applied_sequence, state.poll_cursor, state.fence) == (1, 2, 2)
    assert state.last_policy is not None and state.last_policy.policy.sequence == 1
    # Verified once is fenced: a replay of sequence 2 is refused, not applied again.
    replay = await applier.receive(signer.sign(make_policy(sequence=2, mode="strict")))
    assert replay.refused and "not above" in replay.report.detail


async def test_last_verified_policy_is_reapplied_at_start_without_rollback(
    tmp_path: Path, signer: TestSigner
) -> None:
    await _applier(tmp_path, signer, RecordingFirewall()).receive(
        signer.sign(make_policy(sequence=7))
    )
    restarted_firewall = RecordingFirewall()
    restarted = _applier(tmp_path, signer, restarted_firewall)
    assert restarted_firewall.known is not None  # rollback target restored from state
    await restarted.reapply_last()
    assert restarted_firewall.applied == [(7, False)]


async def test_stored_policy_altered_on_disk_is_not_applied_and_keeps_the_fence(
    tmp_path: Path, signer: TestSigner
) -> None:
    await _applier(tmp_path, signer, RecordingFirewall()).receive(
        signer.sign(make_policy(sequence=7))
    )
    store = StateStore(tmp_path)
    state = store.load()
    assert state.last_policy is not None
    state.last_policy = state.last_policy.model_copy(
        update={"policy": make_policy(sequence=7, mode="none")}
    )
    store.save(state)
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    await applier.reapply_last()
    assert firewall.applied == []
    assert applier.stats.stored_policy_refused == 1
    # Fail closed: the fence stays, so the altered (or any older) policy is never applied, and
    # the table watchdog does not put the unverified policy back either.
    assert StateStore(tmp_path).load().fence == 7
    firewall.present = False
    assert not await applier.ensure_table()
    assert firewall.applied == []


async def test_missing_table_is_put_back(tmp_path: Path, signer: TestSigner) -> None:
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    await applier.receive(signer.sign(make_policy(sequence=1)))
    assert not await applier.ensure_table()
    firewall.present = False
    assert await applier.ensure_table()
    assert firewall.applied[-1] == (1, False)
    assert applier.stats.table_restored == 1


async def test_released_host_needs_no_table(tmp_path: Path, signer: TestSigner) -> None:
    firewall = RecordingFirewall()
    applier = _applier(tmp_path, signer, firewall)
    await applier.receive(signer.sign(make_policy(sequence=1, mode="none")))
    assert not await applier.ensure_table()


def test_state_round_trips_and_starts_empty(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "nested")
    assert store.load() == AgentState()
    store.save(AgentState(agent_id="ep-9", agent_token="tok", poll_cursor=4))
    assert store.load().poll_cursor == 4
    assert (tmp_path / "nested" / "agent-state.json").stat().st_mode & 0o777 == 0o600
