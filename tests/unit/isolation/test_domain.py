"""Pure isolation rules: snapshot, freeze, strict precedence, sequence, delivery state machine."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.isolation.domain import (
    EndpointIsolation,
    EndpointRecord,
    NothingToDo,
    PolicyContext,
    PolicyIssued,
    RequestDenied,
    StatusIgnored,
    TenancyViolationError,
    apply_status,
    decide_isolation,
    decide_release,
    fresh_isolation,
    lane_for,
    snapshot_allowlist,
)
from shared.messages import (
    Actor,
    AllowedPeer,
    AllowlistChanged,
    AllowlistEntry,
    PolicyStatusReported,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SOC = Actor(sub="soc-analyst", role="soc")
PARTNER = Actor(sub="alice", role="partner", account_id="acct-1")
OTHER_PARTNER = Actor(sub="mallory", role="partner", account_id="acct-2")
ENDPOINT = EndpointRecord(endpoint_id="ep-1", account_id="acct-1", hostname="h", platform="linux")


def allowlist(
    *addresses: str, enabled: bool = True, version: int = 1, account: str = "acct-1"
) -> AllowlistChanged:
    return AllowlistChanged(
        account_id=account,
        enabled=enabled,
        version=version,
        updated_at=NOW,
        changed_by=PARTNER,
        entries=tuple(
            AllowlistEntry(id=f"e{i}", name=f"RMM {i}", address=a, created_at=NOW, created_by="a")
            for i, a in enumerate(addresses)
        ),
    )


def ctx(actor: Actor = PARTNER, policy_id: str = "p") -> PolicyContext:
    return PolicyContext(
        policy_id=policy_id, now=NOW, actor=actor, reason="incident", platform=("10.0.0.1",)
    )


def issued(decision: object) -> PolicyIssued:
    assert isinstance(decision, PolicyIssued), decision
    return decision


def isolate(
    current: EndpointIsolation,
    mode: str = "standard",
    actor: Actor = PARTNER,
    settings: AllowlistChanged | None = None,
) -> object:
    return decide_isolation(current, mode, ctx(actor), settings)  # type: ignore[arg-type]


def report(
    state: EndpointIsolation, status: str = "applied", sequence: int | None = None
) -> PolicyStatusReported:
    assert state.policy is not None
    return PolicyStatusReported(
        endpoint_id=state.endpoint_id,
        account_id=state.account_id,
        policy_id=state.policy.policy_id,
        sequence=sequence or state.desired_sequence,
        status=status,  # type: ignore[arg-type]
        rules_sha256="b" * 64 if status == "applied" else None,
        detail="" if status == "applied" else "nft: permission denied",
    )


def test_snapshot_is_the_allowlist_when_enabled() -> None:
    peers, version = snapshot_allowlist("acct-1", allowlist("203.0.113.10", version=4))
    assert peers == (AllowedPeer(name="RMM 0", address="203.0.113.10"),)
    assert version == 4


def test_snapshot_is_empty_when_the_switch_is_off_or_unknown() -> None:
    assert snapshot_allowlist("acct-1", allowlist("203.0.113.10", enabled=False, version=2)) == (
        (),
        2,
    )
    assert snapshot_allowlist("acct-1", None) == ((), 0)


def _v2_allowlist() -> AllowlistChanged:
    from datetime import timedelta

    entries = (
        AllowlistEntry(
            id="v2",
            name="RMM v6",
            address="2001:db8::/64",
            ports=(443, 8041),
            protocol="tcp",
            expires_at=NOW + timedelta(hours=2),
            created_at=NOW,
            created_by="a",
        ),
        AllowlistEntry(
            id="gone",
            name="expired",
            address="198.51.100.0/24",
            expires_at=NOW,
            created_at=NOW,
            created_by="a",
        ),
        AllowlistEntry(
            id="v1", name="plain", address="203.0.113.10", created_at=NOW, created_by="a"
        ),
    )
    return allowlist(version=5).model_copy(update={"entries": entries})


def test_snapshot_copies_ports_protocol_expiry_and_leaves_out_expired_entries() -> None:
    from datetime import timedelta

    peers, version = snapshot_allowlist("acct-1", _v2_allowlist(), now=NOW)
    assert version == 5
    assert peers == (
        AllowedPeer(
            name="RMM v6",
            address="2001:db8::/64",
            ports=(443, 8041),
            protocol="tcp",
            expires_at=NOW + timedelta(hours=2),
        ),
        AllowedPeer(name="plain", address="203.0.113.10"),
    )
    later, _ = snapshot_allowlist("acct-1", _v2_allowlist(), now=NOW + timedelta(hours=2))
    assert [p.name for p in later] == ["plain"]
    earlier, _ = snapshot_allowlist("acct-1", _v2_allowlist(), now=NOW - timedelta(seconds=1))
    assert [p.name for p in earlier] == ["RMM v6", "expired", "plain"]


def test_a_v2_snapshot_is_frozen_and_strict_carries_none_of_it() -> None:
    first = issued(isolate(fresh_isolation(ENDPOINT), settings=_v2_allowlist()))
    assert [p.name for p in first.policy.allowed_outbound] == ["RMM v6", "plain"]
    assert first.policy.allowed_outbound[0].ports == (443, 8041)
    changed = _v2_allowlist().model_copy(update={"entries": (), "version": 6})
    assert isinstance(isolate(first.isolation, settings=changed), NothingToDo)
    strict = issued(isolate(first.isolation, mode="strict", settings=_v2_allowlist()))
    assert strict.policy.allowed_outbound == ()
    # A later standard request never downgrades strict, v2 entries or not.
    assert not isinstance(isolate(strict.isolation, settings=_v2_allowlist()), PolicyIssued)


def test_snapshot_refuses_another_accounts_settings() -> None:
    with pytest.raises(TenancyViolationError):
        snapshot_allowlist("acct-1", allowlist("203.0.113.10", account="acct-2"))


def test_strict_and_release_refuse_another_accounts_settings_too() -> None:
    foreign = allowlist("203.0.113.10", account="acct-2")
    with pytest.raises(TenancyViolationError):
        isolate(fresh_isolation(ENDPOINT), mode="strict", settings=foreign)


def test_strict_records_the_settings_version_it_knew_without_the_entries() -> None:
    strict = issued(
        isolate(
            fresh_isolation(ENDPOINT), mode="strict", settings=allowlist("203.0.113.10", version=4)
        )
    )
    assert (strict.policy.settings_version, strict.policy.allowed_outbound) == (4, ())


def test_snapshots_of_the_same_entries_share_their_checked_peers() -> None:
    settings = allowlist("203.0.113.10", "198.51.100.0/24")
    first, _ = snapshot_allowlist("acct-1", settings)
    again, _ = snapshot_allowlist("acct-1", settings.model_copy(update={"version": 2}))
    assert first == again and all(a is b for a, b in zip(first, again, strict=True))
    renamed = settings.entries[0].model_copy(update={"name": "RMM renamed"})
    moved, _ = snapshot_allowlist(
        "acct-1", settings.model_copy(update={"entries": (renamed, settings.entries[1])})
    )
    assert moved[0].name == "RMM renamed" and moved[1] is first[1]


def test_standard_isolation_freezes_allowlist_into_pending_policy_sequence_one() -> None:
    decision = issued(isolate(fresh_isolation(ENDPOINT), settings=allowlist("203.0.113.10")))
    assert decision.policy.sequence == 1
    assert decision.policy.mode == "standard"
    assert decision.policy.allowed_outbound == (AllowedPeer(name="RMM 0", address="203.0.113.10"),)
    assert decision.policy.platform == ("10.0.0.1",)
    assert decision.isolation.state == "isolation_pending"
    assert decision.isolation.desired_sequence == 1
    assert decision.lane == "normal"


def test_repeating_isolate_changes_nothing_and_keeps_the_frozen_snapshot() -> None:
    first = issued(isolate(fresh_isolation(ENDPOINT), settings=allowlist("203.0.113.10")))
    later_settings = allowlist("198.51.100.7", version=2)
    again = isolate(first.isolation, settings=later_settings)
    assert isinstance(again, NothingToDo)
    isolated = apply_status(first.isolation, report(first.isolation))
    assert isinstance(isolate(isolated, settings=later_settings), NothingToDo)
    assert isolated.policy == first.policy


def test_strict_tightens_standard_with_next_sequence_on_priority_lane() -> None:
    first = issued(isolate(fresh_isolation(ENDPOINT), settings=allowlist("203.0.113.10")))
    strict = issued(isolate(first.isolation, "strict", PARTNER, allowlist("203.0.113.10")))
    assert strict.policy.sequence == 2
    assert strict.policy.allowed_outbound == ()
    assert strict.lane == "priority"
    assert lane_for(strict.policy) == "priority"


def test_standard_request_never_downgrades_strict() -> None:
    strict = issued(isolate(fresh_isolation(ENDPOINT), "strict", SOC))
    assert isinstance(isolate(strict.isolation, "standard", SOC), NothingToDo)
    denied = isolate(strict.isolation, "standard", PARTNER)
    assert isinstance(denied, RequestDenied)
    assert denied.kind == "strict"


def test_only_soc_releases_strict() -> None:
    strict = issued(isolate(fresh_isolation(ENDPOINT), "strict", PARTNER))
    denied = decide_release(strict.isolation, ctx(PARTNER), None)
    assert isinstance(denied, RequestDenied)
    release = issued(decide_release(strict.isolation, ctx(SOC), None))
    assert release.policy.mode == "none"
    assert release.policy.sequence == 2
    assert release.isolation.state == "release_pending"
    assert release.lane == "normal"


def test_partner_releases_standard_isolation() -> None:
    first = issued(isolate(fresh_isolation(ENDPOINT)))
    assert issued(decide_release(first.isolation, ctx(PARTNER), None)).policy.mode == "none"


def test_release_of_a_not_isolated_endpoint_changes_nothing() -> None:
    assert isinstance(decide_release(fresh_isolation(ENDPOINT), ctx(SOC), None), NothingToDo)


def test_partner_of_another_account_is_denied_for_tenancy() -> None:
    denied = isolate(fresh_isolation(ENDPOINT), "standard", OTHER_PARTNER)
    assert isinstance(denied, RequestDenied)
    assert denied.kind == "tenancy"
    assert isinstance(
        decide_release(fresh_isolation(ENDPOINT), ctx(OTHER_PARTNER), None), RequestDenied
    )


def test_applied_report_on_current_sequence_isolates_with_rules_hash() -> None:
    pending = issued(isolate(fresh_isolation(ENDPOINT))).isolation
    isolated = apply_status(pending, report(pending))
    assert isolated.state == "isolated"
    assert isolated.applied_sequence == 1
    assert isolated.rules_sha256 == "b" * 64


def test_failed_report_carries_the_agents_reason_and_isolate_retries() -> None:
    pending = issued(isolate(fresh_isolation(ENDPOINT))).isolation
    failed = apply_status(pending, report(pending, "failed"))
    assert failed.state == "failed"
    assert failed.detail == "nft: permission denied"
    assert failed.isolated_or_pending
    retry = issued(isolate(failed))
    assert retry.policy.sequence == 2


def test_stale_or_duplicate_reports_do_not_count() -> None:
    first = issued(isolate(fresh_isolation(ENDPOINT))).isolation
    strict = issued(isolate(first, "strict")).isolation
    with pytest.raises(StatusIgnored):
        apply_status(strict, report(first))
    isolated = apply_status(strict, report(strict))
    with pytest.raises(StatusIgnored):
        apply_status(isolated, report(strict))


def test_release_applied_returns_to_not_isolated() -> None:
    pending = issued(isolate(fresh_isolation(ENDPOINT))).isolation
    isolated = apply_status(pending, report(pending))
    releasing = issued(decide_release(isolated, ctx(PARTNER), None)).isolation
    done = apply_status(releasing, report(releasing))
    assert done.state == "not_isolated"
    assert not done.isolated_or_pending
    assert issued(isolate(done, settings=allowlist("198.51.100.7", version=9))).policy.sequence == 3


OPS = st.lists(st.sampled_from(["standard", "strict", "release", "applied", "failed"]), max_size=40)


@given(OPS, st.sampled_from([SOC, PARTNER]))
def test_sequences_strictly_increase_and_strict_is_never_loosened_by_standard(
    ops: list[str], actor: Actor
) -> None:
    state = fresh_isolation(ENDPOINT)
    last_sequence = 0
    for op in ops:
        before = state
        if op in ("applied", "failed"):
            if state.policy is None:
                continue
            with contextlib.suppress(StatusIgnored):
                state = apply_status(state, report(state, op))
            continue
        if op == "release":
            decision = decide_release(state, ctx(actor), None)
        else:
            decision = isolate(state, op, actor, allowlist("203.0.113.10"))
        if isinstance(decision, PolicyIssued):
            assert decision.policy.sequence == last_sequence + 1
            last_sequence = decision.policy.sequence
            state = decision.isolation
            if before.strict and op == "standard":
                # Only a retry of the failed strict policy may come out of it, never standard.
                assert decision.policy.mode == "strict"
        assert state.desired_sequence == last_sequence
