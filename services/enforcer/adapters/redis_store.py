"""Redis stores: enrolled agents, the desired signed policy per endpoint (fenced), the dev signing key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.enforcer.domain import AgentIdentity, HeldPolicy, Lane, StoreOutcome
from services.enforcer.handlers import AgentRecord, PolicyToStore
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
    """Enrolled agents by id, and a token-digest index that says which agent a token opens."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    def _agent_key(self, agent_id: str) -> str:
        return self._keys("enforcer", "agent", agent_id)

    def _token_key(self, token_sha256: str) -> str:
        return self._keys("enforcer", "token", token_sha256)

    async def create(self, record: AgentRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._agent_key(record.agent_id),
                mapping={
                    "account_id": record.account_id,
                    "hostname": record.hostname,
                    "platform": record.platform,
                    "token_sha256": record.token_sha256,
                    "enrolled_at": record.enrolled_at,
                },
            )
            pipe.set(
                self._token_key(record.token_sha256),
                orjson.dumps({"agent_id": record.agent_id, "account_id": record.account_id}),
            )
            await pipe.execute()

    async def delete(self, record: AgentRecord) -> None:
        await self._redis.delete(
            self._agent_key(record.agent_id), self._token_key(record.token_sha256)
        )

    async def identity_for_token(self, token_sha256: str) -> AgentIdentity | None:
        raw = await self._redis.get(self._token_key(token_sha256))
        if raw is None:
            return None
        data = orjson.loads(raw)
        return AgentIdentity(agent_id=str(data["agent_id"]), account_id=str(data["account_id"]))


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
