"""One contract for the enrollment-key and agent stores: the in-memory fake, Redis, Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.enforcer.adapters.redis_store import RedisAgentStore, RedisEnrollmentKeyStore
from services.enforcer.domain import CreateOutcome, EnrollmentKeyRecord, ReissueOutcome
from services.enforcer.handlers import AgentRecord, AgentStore, EnrollmentKeyStore
from shared.redis import Keys
from tests.integration.enforcer.conftest import open_backend
from tests.unit.enforcer.fakes import InMemoryAgents, InMemoryEnrollmentKeys

Stores = tuple[EnrollmentKeyStore, AgentStore]


@pytest.fixture(params=["fake", "redis", "cluster"])
async def stores(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Stores]:
    if request.param == "fake":
        yield InMemoryEnrollmentKeys(), InMemoryAgents(max_per_account=2)
        return
    # On the cluster every script must stay in one slot: a CROSSSLOT one would fail here.
    async with open_backend(request, request.param) as backend:
        keys = Keys(redis_prefix)
        client = backend.client
        yield RedisEnrollmentKeyStore(client, keys), RedisAgentStore(client, keys, 2)


def key(key_id: str, at: str, account_id: str = "acct-1") -> EnrollmentKeyRecord:
    return EnrollmentKeyRecord(key_id, account_id, "d" * 64, at, "soc@hq")


def agent(agent_id: str, token: str, account_id: str = "acct-1") -> AgentRecord:
    return AgentRecord(agent_id, account_id, "h", "linux", token, "2026-01-01T00:00:00+00:00")


async def test_rotation_revokes_every_earlier_key_of_the_account_only(stores: Stores) -> None:
    keys, _ = stores
    assert not await keys.any_issued("acct-1")
    assert await keys.rotate(key("a" * 16, "2026-01-01T00:00:00+00:00")) == []
    assert await keys.rotate(key("c" * 16, "2026-01-01T00:00:01+00:00", "acct-2")) == []
    assert await keys.rotate(key("b" * 16, "2026-01-02T00:00:00+00:00")) == ["a" * 16]
    listed = await keys.for_account("acct-1")
    assert [(r.key_id, r.active) for r in listed] == [("a" * 16, False), ("b" * 16, True)]
    assert listed[0].revoked_at == "2026-01-02T00:00:00+00:00"
    other = await keys.get("acct-2", "c" * 16)
    assert other is not None and other.active
    assert await keys.get("acct-2", "a" * 16) is None


async def test_revocation_is_idempotent_and_unknown_keys_are_none(stores: Stores) -> None:
    keys, _ = stores
    await keys.rotate(key("a" * 16, "2026-01-01T00:00:00+00:00"))
    first = await keys.revoke("acct-1", "a" * 16, "2026-01-03T00:00:00+00:00")
    again = await keys.revoke("acct-1", "a" * 16, "2026-01-04T00:00:00+00:00")
    assert first is not None and again is not None
    assert first.revoked_at == again.revoked_at == "2026-01-03T00:00:00+00:00"
    assert await keys.revoke("acct-1", "f" * 16, "2026-01-03T00:00:00+00:00") is None
    assert await keys.any_issued("acct-1")


async def test_agents_are_created_once_capped_per_account_and_reissued_in_their_account(
    stores: Stores,
) -> None:
    _, agents = stores
    assert await agents.create(agent("e1", "t1")) is CreateOutcome.CREATED
    assert await agents.create(agent("e1", "t9")) is CreateOutcome.ID_TAKEN
    assert await agents.create(agent("e2", "t2")) is CreateOutcome.CREATED
    assert await agents.create(agent("e3", "t3")) is CreateOutcome.ACCOUNT_FULL
    assert await agents.create(agent("e4", "t4", "acct-2")) is CreateOutcome.CREATED

    assert await agents.reissue_token("e1", "acct-1", "t1b", "now") is ReissueOutcome.REISSUED
    assert await agents.identity("e1", "t1") is None
    identity = await agents.identity("e1", "t1b")
    assert identity is not None and (identity.agent_id, identity.account_id) == ("e1", "acct-1")
    assert await agents.identity("e2", "t1b") is None, "a token opens only its own agent"
    assert await agents.reissue_token("e4", "acct-1", "x", "now") is ReissueOutcome.OTHER_ACCOUNT
    assert await agents.identity("e4", "x") is None
    assert await agents.reissue_token("e9", "acct-1", "y", "now") is ReissueOutcome.UNKNOWN


async def test_a_deleted_agent_frees_its_place_under_the_cap(stores: Stores) -> None:
    _, agents = stores
    first, second = agent("e1", "t1"), agent("e2", "t2")
    assert await agents.create(first) is CreateOutcome.CREATED
    assert await agents.create(second) is CreateOutcome.CREATED
    await agents.delete(second)
    assert await agents.identity("e2", "t2") is None
    assert await agents.create(agent("e3", "t3")) is CreateOutcome.CREATED
    assert await agents.create(agent("e1", "t9", "acct-2")) is CreateOutcome.ID_TAKEN
    # The refused id was not counted in acct-2: it can still enroll two endpoints.
    assert await agents.create(agent("e5", "t5", "acct-2")) is CreateOutcome.CREATED
    assert await agents.create(agent("e6", "t6", "acct-2")) is CreateOutcome.CREATED
