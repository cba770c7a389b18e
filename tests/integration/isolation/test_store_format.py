"""The isolation store's Redis format: compact, short-lived outcomes; earlier versions' keys read."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from services.isolation.adapters.codec import pack
from services.isolation.adapters.redis_store import RedisIsolationStore
from services.isolation.domain import EndpointIsolation, RequestOutcome
from services.isolation.handlers import CommitConflictError, DuplicateRequest
from services.isolation.timeline import TimelineEvent, fold_timeline, timeline_event
from shared.messages import AllowedPeer, EnforcePolicy, FrozenPolicy
from shared.redis import Keys, make_redis, slot_tag
from tests.helpers import SECURITY

EP = "ep-format-1"
ACCT = "acct-format"
AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


@pytest.fixture
async def service_redis(redis_url: str) -> AsyncIterator[Redis]:
    """The isolation service's own Redis user (its ACL) where the test Redis has users."""
    url = SECURITY.redis_url_for("isolation") if SECURITY.redis_url_for else redis_url
    client = make_redis(url, ca_file=SECURITY.redis_ca_file)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def store(service_redis: Redis, keys: Keys) -> RedisIsolationStore:
    return RedisIsolationStore(service_redis, keys)


def key(keys: Keys, kind: str, name: str) -> str:
    return keys("isolation", slot_tag("iso", EP), kind, name)


def isolated(sequence: int, request_id: str, *, pending: bool = False) -> EndpointIsolation:
    policy = FrozenPolicy(
        policy_id=f"pol-{sequence}",
        endpoint_id=EP,
        account_id=ACCT,
        sequence=sequence,
        mode="standard",
        allowed_outbound=tuple(
            AllowedPeer(name=f"RMM {i}", address=f"203.0.113.{10 + i}") for i in range(5)
        ),
        platform=("198.51.100.1",),
        settings_version=7,
        issued_at=AT + timedelta(minutes=sequence),
        issued_by="soc-1",
        reason="incident 42",
    )
    return EndpointIsolation(
        endpoint_id=EP,
        account_id=ACCT,
        state="isolation_pending" if pending else "isolated",
        mode="standard",
        policy=policy,
        desired_sequence=sequence,
        applied_sequence=0 if pending else sequence,
        rules_sha256=None if pending else hashlib.sha256(b"rules").hexdigest(),
        updated_at=AT + timedelta(minutes=sequence, seconds=5),
        request_ids=(request_id,),
    )


def issued_outcome(isolation: EndpointIsolation, request_id: str) -> RequestOutcome:
    assert isolation.policy is not None
    return RequestOutcome(
        kind="policy",
        endpoint_id=EP,
        account_id=ACCT,
        detail="standard policy",
        lane="normal",
        command=EnforcePolicy(request_id=request_id, policy=isolation.policy),
    )


async def test_state_of_the_previous_version_is_read_and_rewritten_compact(
    store: RedisIsolationStore, redis: Redis, service_redis: Redis, keys: Keys
) -> None:
    old = isolated(2, "req-old")
    state_key = key(keys, "state", EP)
    await redis.hset(state_key, mapping={"doc": old.model_dump_json(), "rev": "4"})

    assert await store.load(EP) == (old, 4)
    assert await store.load_many([EP]) == [old]

    new = isolated(3, "req-new", pending=True)
    await store.commit(4, new, changed=True)
    # Now one string, ``<rev>:<document>``, the document packed with the endpoint as context.
    assert await redis.type(state_key) == b"string"
    stored = await redis.get(state_key)
    assert stored is not None and stored[:3] == b"5:\x02"
    assert len(stored) < len(new.model_dump_json()) / 2
    assert await store.load(EP) == (new, 5)
    assert await store.load_many([EP]) == [new]
    # A second store (another instance, nothing remembered) reads the same bytes the same way.
    assert await RedisIsolationStore(service_redis, keys).load(EP) == (new, 5)


async def test_a_state_packed_as_the_previous_version_did_is_read_and_fenced_by_its_rev(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    # The previous version: a hash whose doc is deflated with the state dictionary (tag 1).
    old = isolated(2, "req-old")
    state_key = key(keys, "state", EP)
    await redis.hset(
        state_key, mapping={"doc": pack("state", old.model_dump_json().encode()), "rev": "7"}
    )
    other = "ep-format-2"
    assert await store.load(EP) == (old, 7)
    assert await store.load_many([other, EP]) == [old]
    prior, current, rev = await store.begin(EP, ACCT, "req-x")
    assert (prior, current, rev) == (None, old, 7)
    # A writer that read an older revision is refused, whichever format the state is in.
    with pytest.raises(CommitConflictError):
        await store.commit(6, isolated(3, "req-new"), changed=True)
    assert await redis.type(state_key) == b"hash"
    await store.commit(7, isolated(3, "req-new"), changed=True)
    assert await redis.type(state_key) == b"string"
    with pytest.raises(CommitConflictError):
        await store.commit(7, isolated(4, "req-newer"), changed=True)
    assert await store.load(EP) == (isolated(3, "req-new"), 8)


async def test_a_state_takes_one_compact_string_in_redis(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    state = isolated(3, "req-1")
    await store.commit(
        0, state, changed=True, request_key="req-1", outcome=issued_outcome(state, "req-1")
    )
    used = await redis.memory_usage(key(keys, "state", EP), samples=0)
    # A hash of the same two values left the compact encoding (its document is over 64 B).
    probe = key(keys, "probe", EP)
    await redis.hset(probe, mapping={"doc": await redis.get(key(keys, "state", EP)), "rev": "1"})
    try:
        as_hash = await redis.memory_usage(probe, samples=0)
    finally:
        await redis.delete(probe)
    assert used is not None and as_hash is not None and used < as_hash


async def test_request_outcome_of_the_previous_version_still_recognises_a_redelivery(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    state = isolated(2, "req-sent")
    await redis.hset(key(keys, "state", EP), mapping={"doc": state.model_dump_json(), "rev": "1"})
    sent = issued_outcome(state, "req-sent")
    await redis.set(key(keys, "request", "req-sent"), sent.model_dump_json(), ex=600)
    await redis.set(key(keys, "request-sent", "req-sent"), b"1", ex=600)
    unsent = issued_outcome(state, "req-unsent")
    await redis.set(key(keys, "request", "req-unsent"), unsent.model_dump_json(), ex=600)

    prior, current, rev = await store.begin(EP, ACCT, "req-sent")
    assert prior == sent.model_copy(update={"sent": True})
    assert (current, rev) == (state, 1)
    prior, _, _ = await store.begin(EP, ACCT, "req-unsent")
    assert prior == unsent  # not sent: the command is there to send again
    with pytest.raises(DuplicateRequest) as dup:
        await store.commit(1, state, changed=False, request_key="req-unsent", outcome=unsent)
    assert dup.value.outcome == unsent

    await store.mark_sent(EP, "req-unsent")
    prior, _, _ = await store.begin(EP, ACCT, "req-unsent")
    assert prior is not None and prior.kind == "policy" and prior.sent
    assert await redis.exists(key(keys, "request", "req-unsent")) == 0


async def test_outcome_is_a_mark_in_the_endpoints_hash_once_its_command_left(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    state = isolated(1, "req-1", pending=True)
    outcome = issued_outcome(state, "req-1")
    await store.commit(0, state, changed=True, request_key="req-1", outcome=outcome)
    # Until the command is acknowledged the whole outcome is kept to send it again.
    prior, _, _ = await store.begin(EP, ACCT, "req-1")
    assert prior == outcome
    assert await redis.exists(key(keys, "request", "req-1")) == 1

    await store.mark_sent(EP, "req-1")
    assert await redis.exists(key(keys, "request", "req-1")) == 0
    prior, _, _ = await store.begin(EP, ACCT, "req-1")
    assert prior == RequestOutcome(kind="policy", endpoint_id=EP, account_id=ACCT, sent=True)
    with pytest.raises(DuplicateRequest) as dup:
        await store.commit(1, state, changed=True, request_key="req-1", outcome=outcome)
    assert dup.value.outcome.sent and dup.value.outcome.kind == "policy"

    noop = RequestOutcome(kind="noop", endpoint_id=EP, account_id=ACCT, detail="already")
    await store.commit(1, state, changed=False, request_key="req-2", outcome=noop)
    prior, _, _ = await store.begin(EP, ACCT, "req-2")
    assert prior is not None and prior.kind == "noop"
    assert await redis.exists(key(keys, "request", "req-2")) == 0

    requests = key(keys, "requests", EP)
    assert await redis.hlen(requests) == 2
    assert 0 < await redis.ttl(requests) <= 24 * 3600
    assert await redis.object("encoding", requests) == b"listpack"


async def test_expired_outcomes_leave_the_hash_at_the_endpoints_next_request(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    requests = key(keys, "requests", EP)
    expired = hashlib.blake2b(b"req-old", digest_size=12).digest()
    await redis.hset(requests, expired, b"1000s")  # expired in 1970
    state = isolated(1, "req-new")
    noop = RequestOutcome(kind="noop", endpoint_id=EP, account_id=ACCT)
    await store.commit(0, state, changed=False, request_key="req-new", outcome=noop)
    assert await redis.hexists(requests, expired) is False
    assert await redis.hlen(requests) == 1


async def test_timeline_reads_events_of_every_format_newest_first(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    """Plain JSON (first version), deflated JSON (the version before this one), binary (now)."""
    first = isolated(1, "req-1", pending=True)
    old_issued = timeline_event(first, issued=True)
    old_applied = timeline_event(isolated(1, "req-1"), issued=False)
    assert old_issued is not None and old_applied is not None
    timeline = key(keys, "timeline", EP)
    deflated_applied = pack("event", old_applied.model_dump_json(exclude_defaults=True).encode())
    await redis.lpush(timeline, old_issued.model_dump_json(), deflated_applied)
    await redis.hset(
        key(keys, "state", EP), mapping={"doc": isolated(1, "req-1").model_dump_json(), "rev": "2"}
    )

    second = isolated(2, "req-2", pending=True)
    await store.commit(
        2, second, changed=True, request_key="req-2", outcome=issued_outcome(second, "req-2")
    )
    await store.commit(3, isolated(2, "req-2"), changed=True)

    events = await store.timeline(EP, 10)
    assert [(e.kind, e.sequence) for e in events] == [
        ("applied", 2),
        ("issued", 2),
        ("applied", 1),
        ("issued", 1),
    ]
    assert events[2:] == [old_applied, old_issued]
    packed = await redis.lindex(timeline, 0)
    assert packed is not None and packed[:1] == b"\x02"
    assert await redis.lindex(timeline, 2) == deflated_applied
    folded = fold_timeline(events, 10)
    assert [(p.sequence, p.status, p.issued_by, p.request_ids) for p in folded] == [
        (2, "applied", "soc-1", ("req-2",)),
        (1, "applied", "soc-1", ("req-1",)),
    ]
    assert isinstance(events[0], TimelineEvent)


async def test_an_isolated_endpoint_costs_redis_a_fraction_of_what_it_did(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    """MEMORY USAGE after ten requests: bounds the per-kind figures of the bench's table."""
    rev = 0
    for sequence in range(1, 11):
        request_id = f"{'a' * 36}:{sequence}"
        pending = isolated(sequence, request_id, pending=True)
        await store.commit(
            rev,
            pending,
            changed=True,
            request_key=request_id,
            outcome=issued_outcome(pending, request_id),
        )
        await store.mark_sent(EP, request_id)
        await store.commit(rev + 1, isolated(sequence, request_id), changed=True)
        rev += 2

    async def usage(kind: str) -> int:
        found = await redis.memory_usage(key(keys, kind, EP), samples=0)
        return int(found or 0)

    assert await usage("state") < 800  # was 1,304 B with the same policy
    assert await usage("requests") < 600  # was ~1,150 B for each request
    print("TIMELINE", await usage("timeline"))
    assert await usage("timeline") < 3_000  # was 6,400 B for these 20 events


async def test_a_timeline_of_issued_ids_stores_them_as_bytes(
    store: RedisIsolationStore, redis: Redis, keys: Keys
) -> None:
    """Ten policies with UUID request and policy ids, as issued: 1,464 B (2,232 B deflated JSON)."""
    rev = 0
    for sequence in range(1, 11):
        request_id = str(uuid.uuid4())
        pending = isolated(sequence, request_id, pending=True)
        assert pending.policy is not None
        policy = pending.policy.model_copy(update={"policy_id": str(uuid.uuid4())})
        pending = pending.model_copy(update={"policy": policy})
        await store.commit(
            rev,
            pending,
            changed=True,
            request_key=request_id,
            outcome=issued_outcome(pending, request_id),
        )
        applied = isolated(sequence, request_id).model_copy(update={"policy": policy})
        await store.commit(rev + 1, applied, changed=True)
        rev += 2
    timeline = key(keys, "timeline", EP)
    assert all(event[:1] == b"\x02" for event in await redis.lrange(timeline, 0, -1))
    assert int(await redis.memory_usage(timeline, samples=0) or 0) < 1_600
    events = await store.timeline(EP, 20)
    assert [(e.kind, e.sequence) for e in events[:2]] == [("applied", 10), ("issued", 10)]
