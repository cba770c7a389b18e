"""Enforcer use cases on in-memory fakes: enrollment, fencing, delivery, status reports."""

from __future__ import annotations

import asyncio

import pytest

from services.enforcer.domain import (
    NORMAL_LANE,
    PRIORITY_LANE,
    EnrollmentKeyRejectedError,
    PolicyNotHeldError,
    UnknownAgentTokenError,
)
from services.enforcer.handlers import (
    EnforcerDeps,
    Enrollment,
    authenticate_agent,
    enroll_agent,
    poll_policy,
    report_policy_status,
    store_policy_commands,
)
from services.enforcer.signing import verify_signed_policy
from shared.enrollment import enrollment_key
from shared.messages import EnforcePolicy, SignedPolicy
from tests.samples import sample_policy
from tests.unit.enforcer.fakes import SECRET, InMemoryWakeups, make_deps


def command(sequence: int, mode: str = "standard", endpoint_id: str = "ep-1") -> EnforcePolicy:
    policy = sample_policy(sequence).model_copy(
        update={"mode": mode, "endpoint_id": endpoint_id, "policy_id": f"pol-{sequence}"}
    )
    return EnforcePolicy(request_id=f"r{sequence}", policy=policy)


async def test_enrollment_with_the_account_key_publishes_the_endpoint_and_returns_a_token() -> None:
    deps, agents, _, events = make_deps()
    enrollment = await enroll_agent(
        deps,
        account_id="acct-1",
        enrollment_key=enrollment_key(SECRET, "acct-1"),
        hostname="web-01",
        platform="linux",
    )
    assert [e.endpoint_id for e in events.registered] == [enrollment.agent_id]
    assert events.registered[0].account_id == "acct-1"
    stored = agents.by_id[enrollment.agent_id]
    assert stored.token_sha256 != enrollment.agent_token
    identity = await authenticate_agent(deps, enrollment.agent_token, enrollment.agent_id)
    assert identity.account_id == "acct-1"


async def test_enrollment_with_another_accounts_key_is_refused() -> None:
    deps, agents, _, events = make_deps()
    with pytest.raises(EnrollmentKeyRejectedError, match="enrollment_key"):
        await enroll_agent(
            deps,
            account_id="acct-1",
            enrollment_key=enrollment_key(SECRET, "acct-2"),
            hostname="web-01",
            platform="linux",
        )
    assert not agents.by_id and not events.registered


async def test_enrollment_leaves_no_credential_when_the_endpoint_cannot_be_published() -> None:
    deps, agents, _, events = make_deps()
    events.fail_next = True
    with pytest.raises(ConnectionError):
        await enroll_agent(
            deps,
            account_id="acct-1",
            enrollment_key=enrollment_key(SECRET, "acct-1"),
            hostname="web-01",
            platform="linux",
        )
    assert not agents.by_id and not agents.by_token


async def test_token_opens_only_its_own_agent() -> None:
    deps, *_ = make_deps()
    key = enrollment_key(SECRET, "acct-1")
    a = await enroll_agent(
        deps, account_id="acct-1", enrollment_key=key, hostname="a", platform="linux"
    )
    b = await enroll_agent(
        deps, account_id="acct-1", enrollment_key=key, hostname="b", platform="linux"
    )
    with pytest.raises(UnknownAgentTokenError, match=f"for agent {b.agent_id}"):
        await authenticate_agent(deps, a.agent_token, b.agent_id)
    with pytest.raises(UnknownAgentTokenError):
        await poll_policy(deps, a.agent_token, b.agent_id, after=0, wait=0)
    with pytest.raises(UnknownAgentTokenError):
        await authenticate_agent(deps, "not-a-token", a.agent_id)


async def test_priority_strict_then_older_normal_command_keeps_the_strict() -> None:
    deps, _, policies, _ = make_deps()
    first = await store_policy_commands(deps, [command(3, "strict")], PRIORITY_LANE)
    late = await store_policy_commands(deps, [command(2, "standard")], NORMAL_LANE)
    assert (first.stored, late.stored, late.stale) == (1, 0, 1)
    held = policies.held_by_endpoint["ep-1"]
    assert held.sequence == 3 and policies.lanes["ep-1"] == PRIORITY_LANE
    assert SignedPolicy.model_validate_json(held.signed_json).policy.mode == "strict"


async def test_duplicate_commands_change_nothing() -> None:
    deps, _, policies, _ = make_deps()
    await store_policy_commands(deps, [command(1)], NORMAL_LANE)
    before = policies.held_by_endpoint["ep-1"]
    again = await store_policy_commands(deps, [command(1), command(1)], NORMAL_LANE)
    assert again.stored == 0 and again.stale == 2
    assert policies.held_by_endpoint["ep-1"] is before


async def test_policy_for_an_endpoint_of_another_account_is_rejected() -> None:
    deps, *_ = make_deps()
    key = enrollment_key(SECRET, "acct-2")
    agent = await enroll_agent(
        deps, account_id="acct-2", enrollment_key=key, hostname="x", platform="linux"
    )
    result = await store_policy_commands(
        deps, [command(1, endpoint_id=agent.agent_id)], NORMAL_LANE
    )
    assert result.stored == 0 and len(result.rejected) == 1
    assert "another account" in result.rejected[0][1]


async def test_foreign_account_command_is_rejected_even_beside_a_newer_one_in_its_batch() -> None:
    deps, *_ = make_deps()
    key = enrollment_key(SECRET, "acct-1")
    agent = await enroll_agent(
        deps, account_id="acct-1", enrollment_key=key, hostname="x", platform="linux"
    )
    foreign = command(1, endpoint_id=agent.agent_id)
    foreign = foreign.model_copy(
        update={"policy": foreign.policy.model_copy(update={"account_id": "acct-2"})}
    )
    own = command(2, endpoint_id=agent.agent_id)
    result = await store_policy_commands(deps, [foreign, own], NORMAL_LANE)
    assert result.stored == 1 and [c for c, _ in result.rejected] == [foreign]


async def test_stored_policy_is_signed_once_and_verifies() -> None:
    deps, _, policies, _ = make_deps()
    await store_policy_commands(deps, [command(4)], NORMAL_LANE)
    signed = SignedPolicy.model_validate_json(policies.held_by_endpoint["ep-1"].signed_json)
    assert verify_signed_policy(signed, deps.signer.public_raw)


async def enrolled(deps: EnforcerDeps) -> Enrollment:
    return await enroll_agent(
        deps,
        account_id="acct-1",
        enrollment_key=enrollment_key(SECRET, "acct-1"),
        hostname="x",
        platform="linux",
    )


async def test_offline_agent_gets_only_the_newest_of_three_policies_at_once() -> None:
    deps, *_ = make_deps()
    agent = await enrolled(deps)
    for sequence in (1, 2, 3):
        await store_policy_commands(
            deps, [command(sequence, endpoint_id=agent.agent_id)], NORMAL_LANE
        )
    held = await poll_policy(deps, agent.agent_token, agent.agent_id, after=0, wait=0)
    assert held is not None and held.sequence == 3


async def test_waiting_agent_is_answered_when_a_newer_policy_is_stored() -> None:
    deps, _, policies, _ = make_deps()
    agent = await enrolled(deps)
    await store_policy_commands(deps, [command(1, endpoint_id=agent.agent_id)], NORMAL_LANE)
    waiting = asyncio.create_task(
        poll_policy(deps, agent.agent_token, agent.agent_id, after=1, wait=10)
    )
    await asyncio.sleep(0)
    assert not waiting.done() and policies.polls == 1
    await store_policy_commands(
        deps, [command(2, "strict", endpoint_id=agent.agent_id)], PRIORITY_LANE
    )
    held = await asyncio.wait_for(waiting, 2)
    assert held is not None and held.sequence == 2
    assert policies.polls == 2, "one check, then one re-check after the wake-up"


async def test_wait_ends_empty_when_nothing_newer_arrives() -> None:
    deps, *_ = make_deps()
    agent = await enrolled(deps)
    await store_policy_commands(deps, [command(1, endpoint_id=agent.agent_id)], NORMAL_LANE)
    assert await poll_policy(deps, agent.agent_token, agent.agent_id, after=1, wait=0.05) is None


async def test_a_draining_process_answers_its_waiting_polls_after_one_more_check() -> None:
    deps, _, policies, _ = make_deps()
    agent = await enrolled(deps)
    await store_policy_commands(deps, [command(1, endpoint_id=agent.agent_id)], NORMAL_LANE)
    waiting = asyncio.create_task(
        poll_policy(deps, agent.agent_token, agent.agent_id, after=1, wait=30)
    )
    await asyncio.sleep(0)
    assert not waiting.done()
    wakeups = deps.wakeups
    assert isinstance(wakeups, InMemoryWakeups)
    wakeups.draining = True
    for waiters in wakeups.waiters.values():
        for waiter in waiters:
            waiter.wake()
    assert await asyncio.wait_for(waiting, 2) is None
    assert policies.polls == 2
    # A poll that arrives while draining does not wait either; one newer than it still delivers.
    assert await poll_policy(deps, agent.agent_token, agent.agent_id, after=1, wait=30) is None
    held = await poll_policy(deps, agent.agent_token, agent.agent_id, after=0, wait=30)
    assert held is not None and held.sequence == 1


async def test_a_poll_with_a_token_revoked_by_reenrollment_is_refused() -> None:
    deps, *_ = make_deps()
    agent = await enrolled(deps)
    await enroll_agent(
        deps,
        account_id="acct-1",
        enrollment_key=enrollment_key(SECRET, "acct-1"),
        hostname="x",
        platform="linux",
        endpoint_id=agent.agent_id,
    )
    with pytest.raises(UnknownAgentTokenError):
        await poll_policy(deps, agent.agent_token, agent.agent_id, after=0, wait=0)


async def test_report_for_the_desired_sequence_is_published() -> None:
    deps, _, policies, events = make_deps()
    key = enrollment_key(SECRET, "acct-1")
    agent = await enroll_agent(
        deps, account_id="acct-1", enrollment_key=key, hostname="x", platform="linux"
    )
    identity = await authenticate_agent(deps, agent.agent_token, agent.agent_id)
    await store_policy_commands(deps, [command(1, endpoint_id=agent.agent_id)], NORMAL_LANE)
    await store_policy_commands(deps, [command(2, endpoint_id=agent.agent_id)], NORMAL_LANE)
    with pytest.raises(PolicyNotHeldError, match="superseded"):
        await report_policy_status(
            deps,
            identity,
            sequence=1,
            policy_id="pol-1",
            status="applied",
            rules_sha256="a" * 64,
            detail="",
        )
    report = await report_policy_status(
        deps,
        identity,
        sequence=2,
        policy_id="pol-2",
        status="applied",
        rules_sha256="b" * 64,
        detail="",
    )
    assert events.reports == [report]
    assert report.account_id == "acct-1" and report.endpoint_id == agent.agent_id
    assert policies.delivery[agent.agent_id] == (2, "applied")
