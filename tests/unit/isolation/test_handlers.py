"""Isolation use cases on in-memory fakes: idempotency, precedence, account-wide strict."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.isolation.domain import EndpointRecord
from services.isolation.handlers import (
    AccountForbiddenError,
    EndpointNotFoundError,
    IsolationService,
    StrictOverrideDeniedError,
)
from shared.messages import (
    Actor,
    AllowlistChanged,
    AllowlistEntry,
    IsolateEndpoint,
    PolicyStatusReported,
    ReleaseEndpoint,
    StrictIsolateAccount,
)
from tests.unit.isolation.fakes import (
    MemoryPublisher,
    MemoryRegistry,
    MemorySettings,
    MemorySettingsClient,
    MemoryStore,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SOC = Actor(sub="soc", role="soc")
PARTNER = Actor(sub="alice", role="partner", account_id="acct-1")
OTHER = Actor(sub="mallory", role="partner", account_id="acct-2")


class World:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.settings = MemorySettings()
        self.registry = MemoryRegistry(
            *(
                EndpointRecord(
                    endpoint_id=f"ep-{i}", account_id="acct-1", hostname="h", platform="linux"
                )
                for i in range(3)
            ),
            EndpointRecord(endpoint_id="ep-x", account_id="acct-2", hostname="h", platform="linux"),
        )
        self.publisher = MemoryPublisher()
        self.client = MemorySettingsClient()
        self.service = IsolationService(
            self.store,
            self.settings,
            self.registry,
            self.publisher,
            self.client,
            platform=("10.0.0.1",),
            clock=lambda: NOW,
        )
        self.settings.by_account["acct-1"] = AllowlistChanged(
            account_id="acct-1",
            enabled=True,
            version=3,
            updated_at=NOW,
            changed_by=PARTNER,
            entries=(
                AllowlistEntry(
                    id="e", name="RMM", address="203.0.113.10", created_at=NOW, created_by="a"
                ),
            ),
        )


@pytest.fixture
def world() -> World:
    return World()


async def test_same_request_twice_yields_one_policy_and_one_command(world: World) -> None:
    request = IsolateEndpoint(endpoint_id="ep-0", mode="standard", requested_by=PARTNER)
    first = await world.service.isolate(request)
    second = await world.service.isolate(request)
    assert first.command == second.command
    assert len(world.publisher.commands) == 1
    sequences = {c.policy.sequence for _, c in world.publisher.commands}
    policies = {c.policy.policy_id for _, c in world.publisher.commands}
    assert sequences == {1}
    assert len(policies) == 1
    state, _ = await world.store.load("ep-0")
    assert state is not None and state.desired_sequence == 1


async def test_command_lost_in_a_crash_is_sent_on_redelivery(world: World) -> None:
    request = IsolateEndpoint(endpoint_id="ep-0", mode="strict", requested_by=SOC)
    world.publisher.fail_next_command = True
    with pytest.raises(ConnectionError):
        await world.service.isolate(request)
    assert world.publisher.commands == []
    await world.service.isolate(request)
    assert [(lane, c.policy.sequence) for lane, c in world.publisher.commands] == [("priority", 1)]


async def test_standard_snapshot_catches_up_settings_first(world: World) -> None:
    await world.service.isolate(
        IsolateEndpoint(endpoint_id="ep-0", mode="standard", requested_by=PARTNER)
    )
    assert world.settings.catch_ups == 1
    ((_, command),) = world.publisher.commands
    assert [p.address for p in command.policy.allowed_outbound] == ["203.0.113.10"]
    assert command.policy.settings_version == 3


async def test_partner_release_of_strict_is_denied_and_audited(world: World) -> None:
    await world.service.isolate(
        IsolateEndpoint(endpoint_id="ep-0", mode="strict", requested_by=SOC)
    )
    with pytest.raises(StrictOverrideDeniedError):
        await world.service.release(ReleaseEndpoint(endpoint_id="ep-0", requested_by=PARTNER))
    with pytest.raises(StrictOverrideDeniedError):
        await world.service.submit_release("ep-0", "", PARTNER)
    denied = [a for a in world.publisher.audits if a.outcome == "denied"]
    assert len(denied) == 2
    assert len(world.publisher.commands) == 1


async def test_unknown_endpoint_and_other_account_are_refused(world: World) -> None:
    with pytest.raises(EndpointNotFoundError):
        await world.service.isolate(
            IsolateEndpoint(endpoint_id="nope", mode="standard", requested_by=SOC)
        )
    with pytest.raises(AccountForbiddenError):
        await world.service.isolate(
            IsolateEndpoint(endpoint_id="ep-0", mode="standard", requested_by=OTHER)
        )
    with pytest.raises(AccountForbiddenError):
        await world.service.isolation_of("ep-0", OTHER)
    assert world.publisher.commands == []


async def test_account_strict_covers_isolated_and_pending_then_disables_allowlist(
    world: World,
) -> None:
    await world.service.isolate(
        IsolateEndpoint(endpoint_id="ep-0", mode="standard", requested_by=PARTNER)
    )
    await world.service.isolate(
        IsolateEndpoint(endpoint_id="ep-1", mode="standard", requested_by=PARTNER)
    )
    await world.service.isolate(
        IsolateEndpoint(endpoint_id="ep-x", mode="standard", requested_by=SOC)
    )
    state, _ = await world.store.load("ep-0")
    assert state is not None and state.policy is not None
    await world.service.record_status(
        PolicyStatusReported(
            endpoint_id="ep-0",
            account_id="acct-1",
            policy_id=state.policy.policy_id,
            sequence=1,
            status="applied",
            rules_sha256="c" * 64,
        )
    )
    _request_id, counted = await world.service.submit_account_strict("acct-1", "rmm", True, PARTNER)
    assert counted == 2
    request = StrictIsolateAccount(account_id="acct-1", reason="rmm", requested_by=PARTNER)
    world.client.fail = True
    with pytest.raises(ConnectionError):
        await world.service.strict_isolate_account(request)
    world.client.fail = False
    world.publisher.requests.clear()
    result = await world.service.strict_isolate_account(request)
    assert result.covered == 2
    assert world.client.disabled == ["acct-1"]
    # Fanned out: one strict request per endpoint on the priority lane, its id derived from the
    # account request's; the first (failed) delivery sent the same ones.
    fanned = [(lane, r) for lane, r in world.publisher.requests if isinstance(r, IsolateEndpoint)]
    assert sorted((lane, r.endpoint_id, r.mode) for lane, r in fanned) == [
        ("priority", "ep-0", "strict"),
        ("priority", "ep-1", "strict"),
    ]
    assert {r.request_id for _, r in fanned} == {
        f"{request.request_id}:ep-0",
        f"{request.request_id}:ep-1",
    }
    # Each endpoint's instance handles its request; a redelivered copy changes nothing.
    for _ in range(2):
        for _, fanned_request in fanned:
            await world.service.isolate(fanned_request)
    strict = [
        (lane, c.policy.endpoint_id)
        for lane, c in world.publisher.commands
        if c.policy.mode == "strict"
    ]
    # The redelivery did not issue or send them again; ep-x (another account) is untouched.
    assert sorted(strict) == [("priority", "ep-0"), ("priority", "ep-1")]
    assert (
        len({c.policy.policy_id for _, c in world.publisher.commands if c.policy.mode == "strict"})
        == 2
    )


async def test_rest_routes_strict_to_priority_lane_and_release_of_strict_too(world: World) -> None:
    await world.service.submit_isolation("ep-0", "strict", "", SOC)
    await world.service.submit_isolation("ep-1", "standard", "", PARTNER)
    await world.service.isolate(
        IsolateEndpoint(endpoint_id="ep-2", mode="strict", requested_by=SOC)
    )
    await world.service.submit_release("ep-2", "", SOC)
    assert [lane for lane, _ in world.publisher.requests] == ["priority", "normal", "priority"]


async def test_preview_changes_nothing(world: World) -> None:
    policy = (await world.service.preview("ep-0", "standard", PARTNER)).policy
    assert policy is not None and policy.sequence == 1
    assert [p.address for p in policy.allowed_outbound] == ["203.0.113.10"]
    assert world.publisher.commands == []
    assert await world.store.load("ep-0") == (None, 0)


async def test_every_state_change_is_an_event_for_other_services(world: World) -> None:
    request = IsolateEndpoint(endpoint_id="ep-0", mode="standard", requested_by=SOC)
    await world.service.isolate(request)
    state, _ = await world.store.load("ep-0")
    assert state is not None and state.policy is not None
    pending = world.publisher.events[-1]
    assert (pending.state, pending.sequence, pending.request_ids) == (
        "isolation_pending",
        1,
        (request.request_id,),
    )
    assert pending.policy_id == state.policy.policy_id
    report = PolicyStatusReported(
        endpoint_id="ep-0",
        account_id="acct-1",
        policy_id=state.policy.policy_id,
        sequence=1,
        status="applied",
        rules_sha256="e" * 64,
    )
    await world.service.record_status(report)
    applied = world.publisher.events[-1]
    assert (applied.state, applied.rules_sha256, applied.request_ids) == (
        "isolated",
        "e" * 64,
        (request.request_id,),
    )
    # A redelivered report changes nothing but says the same again (its event may have been
    # lost in a crash after the state was stored).
    await world.service.record_status(report)
    assert world.publisher.events[-1] == applied.model_copy(
        update={
            "id": world.publisher.events[-1].id,
            "occurred_at": world.publisher.events[-1].occurred_at,
        }
    )
    release = ReleaseEndpoint(endpoint_id="ep-0", requested_by=SOC)
    await world.service.release(release)
    assert (world.publisher.events[-1].state, world.publisher.events[-1].mode) == (
        "release_pending",
        "none",
    )
