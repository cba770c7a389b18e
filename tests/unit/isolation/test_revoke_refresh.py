"""Revoke, refresh and preview on in-memory fakes: only tighter, never another account."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.isolation.domain import EndpointRecord
from services.isolation.handlers import IsolationService, RefreshNotAllowedError
from shared.messages import (
    Actor,
    AllowedPeer,
    AllowlistChanged,
    AllowlistEntry,
    EntryRevoked,
    IsolateEndpoint,
    PolicyStatusReported,
    RefreshIsolation,
    ReleaseEndpoint,
    RevokeEndpointPeer,
)
from tests.unit.isolation.fakes import (
    MemoryPublisher,
    MemoryRegistry,
    MemoryRevocationLog,
    MemorySettings,
    MemorySettingsClient,
    MemoryStore,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SOC = Actor(sub="soc", role="soc")
PARTNER = Actor(sub="alice", role="partner", account_id="acct-1")
RMM = AllowlistEntry(id="e-rmm", name="RMM", address="203.0.113.10", created_at=NOW, created_by="a")
RELAY = AllowlistEntry(
    id="e-relay", name="Relay", address="203.0.113.20", created_at=NOW, created_by="a"
)


def allowlist(account_id: str, version: int, *entries: AllowlistEntry) -> AllowlistChanged:
    return AllowlistChanged(
        account_id=account_id,
        enabled=True,
        version=version,
        updated_at=NOW,
        changed_by=PARTNER,
        entries=entries,
    )


def revoking(
    event: AllowlistChanged, entry: AllowlistEntry, rid: str = "rev-1"
) -> AllowlistChanged:
    return event.model_copy(
        update={
            "version": event.version + 1,
            "entries": tuple(e for e in event.entries if e.id != entry.id),
            "revoked": (EntryRevoked(revocation_id=rid, entry=entry, reason="compromised"),),
        }
    )


class World:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.settings = MemorySettings()
        self.registry = MemoryRegistry(
            *(
                EndpointRecord(
                    endpoint_id=f"ep-{i}", account_id="acct-1", hostname="h", platform="linux"
                )
                for i in range(4)
            ),
            EndpointRecord(endpoint_id="ep-x", account_id="acct-2", hostname="h", platform="linux"),
        )
        self.publisher = MemoryPublisher()
        self.revocations = MemoryRevocationLog()
        self.service = IsolationService(
            self.store,
            self.settings,
            self.registry,
            self.publisher,
            MemorySettingsClient(),
            platform=("10.0.0.1",),
            clock=lambda: NOW,
            revocations=self.revocations,
        )
        self.settings.by_account["acct-1"] = allowlist("acct-1", 3, RMM, RELAY)
        # Another account lists the same address: its endpoints must never be touched.
        self.settings.by_account["acct-2"] = allowlist("acct-2", 1, RMM)

    async def isolate(self, endpoint_id: str, mode: str = "standard") -> None:
        await self.service.isolate(
            IsolateEndpoint(endpoint_id=endpoint_id, mode=mode, requested_by=SOC)  # type: ignore[arg-type]
        )

    async def applied(self, endpoint_id: str) -> None:
        state, _ = await self.store.load(endpoint_id)
        assert state is not None and state.policy is not None
        await self.service.record_status(
            PolicyStatusReported(
                endpoint_id=endpoint_id,
                account_id=state.account_id,
                policy_id=state.policy.policy_id,
                sequence=state.desired_sequence,
                status="applied",
                rules_sha256="a" * 64,
            )
        )

    async def run_fan_out(self) -> list[RevokeEndpointPeer]:
        """Handle every RevokeEndpointPeer the fan-out published, as the priority lane would."""
        handled = []
        for _, request in list(self.publisher.requests):
            if isinstance(request, RevokeEndpointPeer):
                await self.service.revoke_peer(request)
                handled.append(request)
        self.publisher.requests.clear()
        return handled

    async def addresses(self, endpoint_id: str) -> list[str]:
        state, _ = await self.store.load(endpoint_id)
        assert state is not None and state.policy is not None
        return [p.address for p in state.policy.allowed_outbound]


@pytest.fixture
def world() -> World:
    return World()


async def test_revoke_cuts_the_entry_from_every_standard_isolation_of_the_account(
    world: World,
) -> None:
    for endpoint in ("ep-0", "ep-1"):
        await world.isolate(endpoint)
        await world.applied(endpoint)
    await world.isolate("ep-x")
    event = revoking(world.settings.by_account["acct-1"], RMM)
    assert await world.service.revoke_entries(event) == 2
    requests = await world.run_fan_out()
    assert sorted(r.request_id for r in requests) == ["rev-1:ep-0", "rev-1:ep-1"]
    tightened = [c for lane, c in world.publisher.commands if c.request_id.startswith("rev-1:")]
    assert {lane for lane, c in world.publisher.commands if c in tightened} == {"priority"}
    for command in tightened:
        assert command.policy.mode == "standard"
        assert command.policy.sequence == 2
        assert [p.address for p in command.policy.allowed_outbound] == ["203.0.113.20"]
    # The other account's endpoint with the same address keeps its policy.
    assert await world.addresses("ep-x") == ["203.0.113.10"]
    state, _ = await world.store.load("ep-x")
    assert state is not None and state.desired_sequence == 1


async def test_revoke_never_touches_strict_released_or_not_isolated_endpoints(
    world: World,
) -> None:
    await world.isolate("ep-0", "strict")
    await world.isolate("ep-1")
    await world.service.release(ReleaseEndpoint(endpoint_id="ep-1", requested_by=SOC))
    before = len(world.publisher.commands)
    event = revoking(world.settings.by_account["acct-1"], RMM)
    assert await world.service.revoke_entries(event) == 0
    # Even a request aimed at them directly changes nothing.
    for endpoint in ("ep-0", "ep-1", "ep-2"):
        outcome = await world.service.revoke_peer(
            RevokeEndpointPeer(
                request_id=f"rev-1:{endpoint}",
                endpoint_id=endpoint,
                account_id="acct-1",
                revocation_id="rev-1",
                entry=RMM,
                settings_version=4,
                requested_by=PARTNER,
            )
        )
        assert outcome.kind == "noop"
    assert len(world.publisher.commands) == before
    state, _ = await world.store.load("ep-0")
    assert state is not None and state.mode == "strict"


async def test_a_revoke_request_for_another_accounts_endpoint_is_refused(world: World) -> None:
    await world.isolate("ep-x")
    with pytest.raises(PermissionError):
        await world.service.revoke_peer(
            RevokeEndpointPeer(
                request_id="rev-1:ep-x",
                endpoint_id="ep-x",
                account_id="acct-1",
                revocation_id="rev-1",
                entry=RMM,
                settings_version=4,
                requested_by=SOC,
            )
        )
    assert await world.addresses("ep-x") == ["203.0.113.10"]
    assert world.publisher.audits[-1].outcome == "denied"


async def test_a_redelivered_revocation_issues_no_second_policy(world: World) -> None:
    await world.isolate("ep-0")
    event = revoking(world.settings.by_account["acct-1"], RMM)
    await world.service.revoke_entries(event)
    first = await world.run_fan_out()
    # The fan-out record redelivered, and the per-endpoint request redelivered as well.
    assert await world.service.revoke_entries(event) == 0
    for request in first:
        outcome = await world.service.revoke_peer(request)
        assert outcome.kind == "policy" and outcome.command is not None
        assert outcome.command.policy.sequence == 2
    sequences = [c.policy.sequence for _, c in world.publisher.commands]
    assert sequences == [1, 2]


async def test_a_pending_isolation_loses_the_entry_too(world: World) -> None:
    await world.isolate("ep-0")  # pending: the agent has not reported yet
    event = revoking(world.settings.by_account["acct-1"], RMM)
    await world.service.revoke_entries(event)
    await world.run_fan_out()
    assert await world.addresses("ep-0") == ["203.0.113.20"]


async def test_a_snapshot_that_raced_the_revocation_is_tightened_at_once(world: World) -> None:
    # The fan-out recorded the revocation and found nothing to do; meanwhile an isolation
    # snapshotted the version before it (its replica had not seen the revocation yet).
    event = revoking(world.settings.by_account["acct-1"], RMM)
    assert await world.service.revoke_entries(event) == 0
    await world.isolate("ep-0")
    lanes = [(lane, c.policy.sequence) for lane, c in world.publisher.commands]
    assert lanes == [("normal", 1), ("priority", 2)]
    assert await world.addresses("ep-0") == ["203.0.113.20"]


async def test_refresh_takes_the_current_allowlist_without_a_release(world: World) -> None:
    world.settings.by_account["acct-1"] = allowlist("acct-1", 3, RMM)
    await world.isolate("ep-0")
    await world.applied("ep-0")
    world.settings.by_account["acct-1"] = allowlist("acct-1", 4, RMM, RELAY)
    preview = await world.service.preview("ep-0", "standard", PARTNER)
    assert [p.address for p in preview.diff.added] == ["203.0.113.20"]
    assert preview.diff.removed == ()
    assert preview.current_settings_version == 4
    request_id = await world.service.submit_refresh("ep-0", "relay added", PARTNER)
    lane, request = world.publisher.requests[-1]
    assert lane == "normal" and isinstance(request, RefreshIsolation)
    assert request.request_id == request_id
    outcome = await world.service.refresh(request)
    assert outcome.kind == "policy" and outcome.command is not None
    policy = outcome.command.policy
    assert (policy.mode, policy.sequence, policy.settings_version) == ("standard", 2, 4)
    assert [p.address for p in policy.allowed_outbound] == ["203.0.113.10", "203.0.113.20"]
    assert any(
        a.action == "isolation.refresh" and a.actor == PARTNER for a in world.publisher.audits
    )
    # Nothing new to take: a second refresh changes nothing.
    again = await world.service.refresh(request.model_copy(update={"request_id": "r2"}))
    assert again.kind == "noop"


@pytest.mark.parametrize("setup", ["strict", "not_isolated", "release_pending"])
async def test_refresh_is_refused_unless_in_standard_isolation(world: World, setup: str) -> None:
    if setup == "strict":
        await world.isolate("ep-0", "strict")
    elif setup == "release_pending":
        await world.isolate("ep-0")
        await world.service.release(ReleaseEndpoint(endpoint_id="ep-0", requested_by=SOC))
    with pytest.raises(RefreshNotAllowedError):
        await world.service.submit_refresh("ep-0", "", SOC)
    assert world.publisher.requests == []


async def test_a_refresh_that_arrives_after_a_strict_keeps_strict(world: World) -> None:
    await world.isolate("ep-0")
    await world.isolate("ep-0", "strict")
    outcome = await world.service.refresh(RefreshIsolation(endpoint_id="ep-0", requested_by=SOC))
    assert outcome.kind == "noop"
    state, _ = await world.store.load("ep-0")
    assert state is not None and state.mode == "strict" and state.policy is not None
    assert state.policy.allowed_outbound == ()


async def test_preview_diff_is_empty_when_not_isolated(world: World) -> None:
    preview = await world.service.preview("ep-0", "standard", SOC)
    assert preview.policy is not None and len(preview.policy.allowed_outbound) == 2
    assert preview.diff.added == () and preview.diff.removed == ()


async def test_revocation_progress_counts_tightened_and_applied(world: World) -> None:
    for endpoint in ("ep-0", "ep-1", "ep-2"):
        await world.isolate(endpoint)
    target = AllowedPeer(name="", address=RMM.address)
    before = await world.service.revocation_progress("acct-1", "rev-1", target, SOC)
    assert (before.endpoints, before.tightened, before.applied) == (3, 0, 0)
    await world.service.revoke_entries(revoking(world.settings.by_account["acct-1"], RMM))
    await world.run_fan_out()
    await world.applied("ep-0")
    after = await world.service.revocation_progress("acct-1", "rev-1", target, SOC)
    assert (after.endpoints, after.tightened, after.applied, after.failed) == (3, 3, 1, 0)


async def test_revoke_matches_address_ports_and_protocol_not_the_address_alone(
    world: World,
) -> None:
    agent = RMM.model_copy(update={"id": "e-agent", "ports": (8041,), "protocol": "tcp"})
    dns = RMM.model_copy(update={"id": "e-dns", "name": "DNS", "ports": (53,), "protocol": "udp"})
    world.settings.by_account["acct-1"] = allowlist("acct-1", 5, agent, dns)
    await world.isolate("ep-0")
    # The same peer spelled as a /32 prefix is the same peer.
    revoked = agent.model_copy(update={"address": "203.0.113.10/32"})
    await world.service.revoke_entries(revoking(world.settings.by_account["acct-1"], revoked))
    await world.run_fan_out()
    state, _ = await world.store.load("ep-0")
    assert state is not None and state.policy is not None
    assert [(p.ports, p.protocol) for p in state.policy.allowed_outbound] == [((53,), "udp")]


async def test_a_replayed_revocation_does_not_cut_the_entry_added_back_since(world: World) -> None:
    revoked_at_4 = revoking(world.settings.by_account["acct-1"], RMM)
    await world.service.revoke_entries(revoked_at_4)
    # The partner adds the address back (a new server); an isolation snapshots version 5.
    world.settings.by_account["acct-1"] = allowlist("acct-1", 5, RELAY, RMM)
    await world.isolate("ep-0")
    assert await world.addresses("ep-0") == ["203.0.113.20", "203.0.113.10"]
    # The version-4 event redelivered: nothing for the newer snapshot.
    assert await world.service.revoke_entries(revoked_at_4) == 0
    state, _ = await world.store.load("ep-0")
    assert state is not None and state.desired_sequence == 1
