"""Redis stores: enrolled agents, the desired signed policy per endpoint (fenced), the dev signing key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.enforcer.domain import (
    AgentIdentity,
    CreateOutcome,
    EnrollmentKeyRecord,
    HeldPolicy,
    Lane,
    ReissueOutcome,
    StoreOutcome,
)
from services.enforcer.handlers import AgentRecord, PolicyToStore, RateDecision
from shared.redis import Keys

log = logging.getLogger(__name__)

DELIVERY_STATES = ("pending", "applied", "failed")

# Compare-and-set of the desired policy (guarantee 6). Atomic in Redis, so two enforcer instances
# (or the two lanes) racing on one endpoint can never store an older sequence over a newer one.
# The wake-up is published in the same script: a policy is announced only once it is stored.
_STORE_IF_NEWER = """
local enrolled_account = redis.call('HGET', KEYS[2], 'account_id')
if enrolled_account and enrolled_account ~= ARGV[4] then
  return 2
end
local held = redis.call('HGET', KEYS[1], 'sequence')
if held and tonumber(held) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'sequence', ARGV[1], 'signed', ARGV[2], 'policy_id', ARGV[3],
  'account_id', ARGV[4], 'lane', ARGV[5], 'stored_at_ms', ARGV[6], 'delivery', 'pending')
redis.call('SADD', KEYS[3], ARGV[7])
redis.call('SREM', KEYS[4], ARGV[7])
redis.call('SREM', KEYS[5], ARGV[7])
redis.call('PUBLISH', ARGV[8], ARGV[7] .. ' ' .. ARGV[1])
return 1
"""

# Delivery bookkeeping only moves if the report is still about the desired sequence.
_MARK_DELIVERY = """
local held = redis.call('HGET', KEYS[1], 'sequence')
if (not held) or tonumber(held) ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'delivery', ARGV[2])
redis.call('SREM', KEYS[2], ARGV[3])
if ARGV[2] == 'applied' then
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('SREM', KEYS[4], ARGV[3])
else
  redis.call('SADD', KEYS[4], ARGV[3])
  redis.call('SREM', KEYS[3], ARGV[3])
end
return 1
"""


# A new agent id is written only if no agent holds it, so a re-created id can never overwrite
# (and orphan the token of) an agent another request just enrolled; and only while the account
# is under its endpoint cap, so a leaked key cannot pile up endpoints without bound.
_CREATE_AGENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[7]) then
  return 2
end
redis.call('HSET', KEYS[1], 'account_id', ARGV[1], 'hostname', ARGV[2], 'platform', ARGV[3],
  'token_sha256', ARGV[4], 'enrolled_at', ARGV[5])
redis.call('SET', KEYS[2], ARGV[6])
redis.call('SADD', KEYS[3], ARGV[8])
return 1
"""

_CREATE_OUTCOMES = {
    0: CreateOutcome.ID_TAKEN,
    1: CreateOutcome.CREATED,
    2: CreateOutcome.ACCOUNT_FULL,
}

# Re-enrollment: swap the agent's token in one step, so the old token stops working exactly
# when the new one starts. An id unknown as an agent but holding another account's desired
# policy is another account's endpoint whose agent record was lost: never re-created here.
# The old token's key is derived in the script (ARGV[4] is its prefix); like the other agent
# keys it is not hash-tagged, so this script assumes one Redis (not a Cluster) as they do.
_REISSUE_TOKEN = """
local account = redis.call('HGET', KEYS[1], 'account_id')
if not account then
  local policy_account = redis.call('HGET', KEYS[3], 'account_id')
  if policy_account and policy_account ~= ARGV[1] then
    return 2
  end
  return 0
end
if account ~= ARGV[1] then
  return 2
end
local old = redis.call('HGET', KEYS[1], 'token_sha256')
if old then
  redis.call('DEL', ARGV[4] .. old)
end
redis.call('HSET', KEYS[1], 'token_sha256', ARGV[2], 'reenrolled_at', ARGV[3])
redis.call('SET', KEYS[2], ARGV[5])
return 1
"""

_REISSUE_OUTCOMES = {
    0: ReissueOutcome.UNKNOWN,
    1: ReissueOutcome.REISSUED,
    2: ReissueOutcome.OTHER_ACCOUNT,
}

# Rotation: the new key and the revocation of every earlier one are one step, so there is no
# moment where neither or both generations open enrollment.
_ROTATE_KEYS = """
local revoked = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local record = cjson.decode(fields[i + 1])
  if record['revoked_at'] == cjson.null or record['revoked_at'] == nil then
    record['revoked_at'] = ARGV[3]
    redis.call('HSET', KEYS[1], fields[i], cjson.encode(record))
    table.insert(revoked, fields[i])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return revoked
"""

_REVOKE_KEY = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return false
end
local record = cjson.decode(raw)
if record['revoked_at'] == cjson.null or record['revoked_at'] == nil then
  record['revoked_at'] = ARGV[2]
  raw = cjson.encode(record)
  redis.call('HSET', KEYS[1], ARGV[1], raw)
end
return raw
"""

# Fixed window per account: the first attempt of a window starts its expiry. The TTL is
# repaired if it ever went missing, so a counter can never block an account forever.
_RATE_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if n == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


def _account_slot(account_id: str) -> str:
    # Hash tag: every per-account key of the enrollment path lands in one Cluster slot.
    return "{" + account_id + "}"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


_OUTCOMES = {0: StoreOutcome.STALE, 1: StoreOutcome.STORED, 2: StoreOutcome.WRONG_ACCOUNT}


class RedisPolicyStore:
    """Desired policy per endpoint: a hash with the sequence and the signed policy JSON."""

    def __init__(self, redis: Redis, keys: Keys, wake_channel: str) -> None:
        self._redis = redis
        self._keys = keys
        self._wake_channel = wake_channel
        self._store = redis.register_script(_STORE_IF_NEWER)
        self._mark = redis.register_script(_MARK_DELIVERY)

    def _policy_key(self, endpoint_id: str) -> str:
        return self._keys("enforcer", "policy", endpoint_id)

    def _delivery_key(self, state: str) -> str:
        return self._keys("enforcer", "delivery", state)

    async def store_if_newer(
        self, items: Sequence[PolicyToStore], lane: Lane
    ) -> list[StoreOutcome]:
        if not items:
            return []
        now_ms = str(int(time.time() * 1000))
        pending, applied, failed = (self._delivery_key(s) for s in DELIVERY_STATES)
        # One pipeline per batch: a round trip per batch rather than per command.
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in items:
                policy = item.policy
                await self._store(
                    keys=[
                        self._policy_key(policy.endpoint_id),
                        self._keys("enforcer", "agent", policy.endpoint_id),
                        pending,
                        applied,
                        failed,
                    ],
                    args=[
                        policy.sequence,
                        item.signed_json,
                        policy.policy_id,
                        policy.account_id,
                        lane,
                        now_ms,
                        policy.endpoint_id,
                        self._wake_channel,
                    ],
                    client=pipe,
                )
            results = await pipe.execute()
        return [_OUTCOMES[int(code)] for code in results]

    async def held(self, endpoint_id: str) -> HeldPolicy | None:
        sequence, signed, policy_id, account_id = await self._redis.hmget(
            self._policy_key(endpoint_id), ["sequence", "signed", "policy_id", "account_id"]
        )
        if sequence is None or signed is None:
            return None
        return HeldPolicy(
            endpoint_id=endpoint_id,
            account_id=_text(account_id),
            policy_id=_text(policy_id),
            sequence=int(sequence),
            signed_json=signed if isinstance(signed, bytes) else signed.encode(),
        )

    async def mark_delivery(self, endpoint_id: str, sequence: int, status: str) -> None:
        await self._mark(
            keys=[self._policy_key(endpoint_id), *map(self._delivery_key, DELIVERY_STATES)],
            args=[sequence, status, endpoint_id],
        )

    async def delivery_counts(self) -> dict[str, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for state in DELIVERY_STATES:
                pipe.scard(self._delivery_key(state))
            counts = await pipe.execute()
        return {state: int(n) for state, n in zip(DELIVERY_STATES, counts, strict=True)}


class RedisAgentStore:
    """Enrolled agents by id, a token-digest index that says which agent a token opens, and the
    set of each account's endpoints (for the per-account cap)."""

    def __init__(self, redis: Redis, keys: Keys, max_per_account: int = 10_000) -> None:
        self._redis = redis
        self._keys = keys
        self._max_per_account = max_per_account
        self._create = redis.register_script(_CREATE_AGENT)
        self._reissue = redis.register_script(_REISSUE_TOKEN)

    def _agent_key(self, agent_id: str) -> str:
        return self._keys("enforcer", "agent", agent_id)

    def _token_key(self, token_sha256: str) -> str:
        return self._keys("enforcer", "token", token_sha256)

    def _account_agents_key(self, account_id: str) -> str:
        return self._keys("enforcer", "account-agents", _account_slot(account_id))

    async def create(self, record: AgentRecord) -> CreateOutcome:
        code = await self._create(
            keys=[
                self._agent_key(record.agent_id),
                self._token_key(record.token_sha256),
                self._account_agents_key(record.account_id),
            ],
            args=[
                record.account_id,
                record.hostname,
                record.platform,
                record.token_sha256,
                record.enrolled_at,
                orjson.dumps({"agent_id": record.agent_id, "account_id": record.account_id}),
                self._max_per_account,
                record.agent_id,
            ],
        )
        return _CREATE_OUTCOMES[int(code)]

    async def reissue_token(
        self, agent_id: str, account_id: str, token_sha256: str, reenrolled_at: str
    ) -> ReissueOutcome:
        code = await self._reissue(
            keys=[
                self._agent_key(agent_id),
                self._token_key(token_sha256),
                self._keys("enforcer", "policy", agent_id),
            ],
            args=[
                account_id,
                token_sha256,
                reenrolled_at,
                self._token_key(""),
                orjson.dumps({"agent_id": agent_id, "account_id": account_id}),
            ],
        )
        return _REISSUE_OUTCOMES[int(code)]

    async def delete(self, record: AgentRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._agent_key(record.agent_id), self._token_key(record.token_sha256))
            pipe.srem(self._account_agents_key(record.account_id), record.agent_id)
            await pipe.execute()

    async def identity_for_token(self, token_sha256: str) -> AgentIdentity | None:
        raw = await self._redis.get(self._token_key(token_sha256))
        if raw is None:
            return None
        data = orjson.loads(raw)
        return AgentIdentity(agent_id=str(data["agent_id"]), account_id=str(data["account_id"]))


def _key_record(raw: bytes | str) -> EnrollmentKeyRecord:
    data = orjson.loads(raw)
    revoked_at = data.get("revoked_at")
    return EnrollmentKeyRecord(
        key_id=str(data["key_id"]),
        account_id=str(data["account_id"]),
        key_sha256=str(data["key_sha256"]),
        created_at=str(data["created_at"]),
        created_by=str(data["created_by"]),
        revoked_at=None if revoked_at is None else str(revoked_at),
    )


class RedisEnrollmentKeyStore:
    """One hash per account (``{prefix}enforcer:ek:{<account_id>}``): key id → record JSON.

    A record holds the key's SHA-256, never the key. Revoked keys stay as records: they are
    the account's key history, and they keep the dev-derived key retired after a rotation.
    """

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._rotate = redis.register_script(_ROTATE_KEYS)
        self._revoke = redis.register_script(_REVOKE_KEY)

    def _hash(self, account_id: str) -> str:
        return self._keys("enforcer", "ek", _account_slot(account_id))

    async def get(self, account_id: str, key_id: str) -> EnrollmentKeyRecord | None:
        raw = await self._redis.hget(self._hash(account_id), key_id)
        return None if raw is None else _key_record(raw)

    async def for_account(self, account_id: str) -> list[EnrollmentKeyRecord]:
        raw = await self._redis.hvals(self._hash(account_id))
        return sorted((_key_record(r) for r in raw), key=lambda r: (r.created_at, r.key_id))

    async def any_issued(self, account_id: str) -> bool:
        return bool(await self._redis.exists(self._hash(account_id)))

    async def rotate(self, record: EnrollmentKeyRecord) -> list[str]:
        body = orjson.dumps(
            {
                "key_id": record.key_id,
                "account_id": record.account_id,
                "key_sha256": record.key_sha256,
                "created_at": record.created_at,
                "created_by": record.created_by,
                "revoked_at": None,
            }
        )
        revoked = await self._rotate(
            keys=[self._hash(record.account_id)], args=[record.key_id, body, record.created_at]
        )
        return sorted(_text(key_id) for key_id in revoked)

    async def revoke(
        self, account_id: str, key_id: str, revoked_at: str
    ) -> EnrollmentKeyRecord | None:
        raw = await self._revoke(keys=[self._hash(account_id)], args=[key_id, revoked_at])
        return None if raw is None else _key_record(raw)


class RedisEnrollmentRateLimiter:
    """Enrollment attempts per account in fixed one-minute windows (one counter per account)."""

    WINDOW_MS = 60_000

    def __init__(self, redis: Redis, keys: Keys, per_minute: int) -> None:
        self._redis = redis
        self._keys = keys
        self._per_minute = per_minute
        self._hit = redis.register_script(_RATE_HIT)

    async def hit(self, account_id: str) -> RateDecision:
        count, ttl_ms = await self._hit(
            keys=[self._keys("enforcer", "enroll-rate", _account_slot(account_id))],
            args=[self.WINDOW_MS],
        )
        return RateDecision(
            allowed=int(count) <= self._per_minute,
            limit=self._per_minute,
            retry_after_s=max(1, -(-int(ttl_ms) // 1000)),
        )


async def load_or_create_dev_signing_key(
    redis: Redis, key: str, generate: str, *, timeout: float = 60.0
) -> tuple[str, bool]:
    """The deployment's dev signing key (base64): the first instance's ``generate`` wins (SET NX).

    Kept in Redis so every instance and every restart signs with the same key; returns the key
    and whether this call created it.
    """
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            created = bool(await redis.set(key, generate, nx=True))
            stored = await redis.get(key)
            if stored is None:
                raise RuntimeError(f"dev signing key {key} vanished right after it was set")
            return _text(stored), created
        except (RedisError, OSError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("waiting for redis to load the dev signing key: %r", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
