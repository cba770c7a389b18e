"""Redis stores: enrolled agents, the desired signed policy per endpoint (fenced), the dev signing key."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import zlib
from collections.abc import Sequence
from typing import Any

import orjson
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)

from services.enforcer.domain import (
    AgentIdentity,
    CreateOutcome,
    DesiredPolicyRef,
    EnrollmentKeyRecord,
    HeldPolicy,
    Lane,
    ReissueOutcome,
    StoreOutcome,
)
from services.enforcer.handlers import AgentRecord, PolicyToStore, PollResult, RateDecision
from shared.deflate import deflate_raw, inflate_raw
from shared.redis import Keys, RedisClient, bucket_tags, slot_tag

log = logging.getLogger(__name__)

DELIVERY_STATES = ("pending", "applied", "failed")

# What a Redis Cluster raises while a master fails over or slots move: "away for now", never
# "this record is bad". RedisClusterException (e.g. no reachable node) is not a RedisError.
CLUSTER_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    RedisClusterException,
    ClusterDownError,
    MasterDownError,
    TryAgainError,
)

# Every key of an endpoint (agent record with its token digest, desired signed policy,
# the delivery sets of its bucket, its wake channel) carries the endpoint's hash tag
# ``{enf<bucket>}``: each script below touches one Redis Cluster slot. Per-account keys carry
# ``{<account_id>}``. No key holds every endpoint: the delivery sets and wake channels are per
# bucket (``SLOT_BUCKETS`` of them).
TAG = "enf"


class EnforcerKeys:
    """The enforcer's key and channel names (``<prefix>enforcer:<kind>:<hash tag>[:<id>]``)."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys

    def agent(self, endpoint_id: str) -> str:
        return self.agent_of(slot_tag(TAG, endpoint_id), endpoint_id)

    def agent_of(self, tag: str, endpoint_id: str) -> str:
        """``agent(endpoint_id)`` when its hash tag is already known."""
        return self._keys("enforcer", "agent", tag, endpoint_id)

    def policy(self, endpoint_id: str) -> str:
        return self.policy_of(slot_tag(TAG, endpoint_id), endpoint_id)

    def policy_of(self, tag: str, endpoint_id: str) -> str:
        """``policy(endpoint_id)`` when its hash tag is already known."""
        return self._keys("enforcer", "policy", tag, endpoint_id)

    def delivery(self, tag: str, state: str) -> str:
        return self._keys("enforcer", "delivery", tag, state)

    def deliveries(self, endpoint_id: str) -> list[str]:
        tag = slot_tag(TAG, endpoint_id)
        return [self.delivery(tag, state) for state in DELIVERY_STATES]

    def wake(self, endpoint_id: str) -> str:
        return self.wake_of_tag(slot_tag(TAG, endpoint_id))

    def wake_of_tag(self, tag: str) -> str:
        return self._keys("enforcer", "wake", tag)

    def wake_channels(self) -> list[str]:
        """Every bucket's wake channel (sharded pub/sub: each lives on its bucket's shard)."""
        return [self.wake_of_tag(tag) for tag in bucket_tags(TAG)]

    def account_agents(self, account_id: str) -> str:
        return self._keys("enforcer", "account-agents", _account_slot(account_id))

    def enrollment_keys(self, account_id: str) -> str:
        return self._keys("enforcer", "ek", _account_slot(account_id))

    def enroll_rate(self, account_id: str) -> str:
        return self._keys("enforcer", "enroll-rate", _account_slot(account_id))


# The desired policy of an endpoint is one string, the signed policy stored once behind a short
# fixed-width header: the sequence (20 digits), the byte lengths of the policy id and of the
# account id (3 digits each), those two ids, then the signed policy JSON, compressed. A
# script compares the sequence with GETRANGE 0 19 and never reads the signed bytes to do so.
_SEQ_WIDTH = 20
# The compressed body: ``\x02`` then raw deflate with a preset dictionary (v2), or a gzip
# stream (v1, what earlier versions wrote, still read). The dictionary is the signed policy's
# field names in the order they are dumped, then the record's own account id, endpoint id (from
# the key) and policy id (from the header): each of them in the JSON is a back-reference of a
# few bits instead of up to 36 characters, and gzip has no preset dictionary at all. The
# dictionary is part of the stored format: never edit it, add a new tag beside it.
_BODY_DEFLATE_V2 = b"\x02"
_GZIP_MAGIC = b"\x1f\x8b"
_POLICY_DICTIONARY = (
    b'{"policy":{"policy_id":"","endpoint_id":"","account_id":"","sequence":,"mode":"standard",'
    b'"allowed_outbound":[{"name":"","address":"","ports":[],"protocol":"any","expires_at":null}'
    b'],"platform":[""],"settings_version":,"issued_at":"2026-12-02T00:00:00.000000Z",'
    b'"issued_by":"","reason":""},"signature":"==","key_id":"'
)

# Compare-and-set of the desired policy (guarantee 6), for every policy of a lane batch whose
# endpoint is in one bucket (one slot): KEYS are the bucket's three delivery sets, then the policy
# and agent keys of each endpoint; ARGV the bucket's wake channel, then per endpoint its sequence,
# record, account and id. Atomic in Redis, so two enforcer instances (or the two lanes) racing on
# one endpoint can never store an older sequence over a newer one. The wake-up is published
# (SPUBLISH, on the bucket's shard) in the same script, one message naming every endpoint stored
# ("<endpoint> <sequence>" lines): a policy is announced only once it is stored. Answers one code
# per endpoint, in order (0 stale, 1 stored, 2 another account's endpoint).
_STORE_IF_NEWER = """
local codes = {}
local stored = {}
for i = 0, (#KEYS - 3) / 2 - 1 do
  local policy_key, agent_key = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local seq, record = ARGV[2 + 4 * i], ARGV[3 + 4 * i]
  local account, endpoint = ARGV[4 + 4 * i], ARGV[5 + 4 * i]
  local code = 1
  local enrolled_account = redis.call('HGET', agent_key, 'account_id')
  if enrolled_account and enrolled_account ~= account then
    code = 2
  else
    local held = redis.call('GETRANGE', policy_key, 0, 19)
    if held ~= '' and tonumber(held) >= tonumber(seq) then
      code = 0
    end
  end
  if code == 1 then
    redis.call('SET', policy_key, record)
    redis.call('SADD', KEYS[1], endpoint)
    redis.call('SREM', KEYS[2], endpoint)
    redis.call('SREM', KEYS[3], endpoint)
    stored[#stored + 1] = endpoint .. ' ' .. seq
  end
  codes[#codes + 1] = code
end
if #stored > 0 then
  redis.call('SPUBLISH', ARGV[1], table.concat(stored, '\\n'))
end
return codes
"""

# The whole agent request in one round trip: the token (its digest, kept in the agent record of
# the endpoint the route names), the cursor, and the policy only if it is newer. An idle poll
# reads two short fields and 20 bytes of sequence.
_POLL = """
local agent = redis.call('HMGET', KEYS[1], 'token_sha256', 'account_id')
if agent[1] ~= ARGV[1] then
  return {0}
end
local seq = redis.call('GETRANGE', KEYS[2], 0, 19)
if seq == '' or tonumber(seq) <= tonumber(ARGV[2]) then
  return {1, agent[2]}
end
return {2, agent[2], redis.call('GET', KEYS[2]) or ''}
"""

# A status report moves the delivery bookkeeping only if it names the desired sequence and
# policy id; the script answers both either way ({} when the endpoint has no policy).
_RECORD_DELIVERY = """
local header = redis.call('GETRANGE', KEYS[1], 0, 25)
if header == '' then
  return {}
end
local seq = string.sub(header, 1, 20)
local id_len = tonumber(string.sub(header, 21, 23))
local policy_id = redis.call('GETRANGE', KEYS[1], 26, 25 + id_len)
if tonumber(seq) == tonumber(ARGV[1]) and policy_id == ARGV[2] then
  redis.call('SREM', KEYS[2], ARGV[4])
  if ARGV[3] == 'applied' then
    redis.call('SADD', KEYS[3], ARGV[4])
    redis.call('SREM', KEYS[4], ARGV[4])
  else
    redis.call('SADD', KEYS[4], ARGV[4])
    redis.call('SREM', KEYS[3], ARGV[4])
  end
end
return {seq, policy_id}
"""

# The per-account endpoint cap, in the account's slot, before the agent is written in the
# endpoint's slot: 1 = already counted, 2 = the account is full, 3 = counted now (the caller
# uncounts it if the agent id turns out to be taken).
_COUNT_AGENT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 1
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 2
end
redis.call('SADD', KEYS[1], ARGV[1])
return 3
"""

# A new agent id is written only if no agent holds it, so a re-created id can never overwrite
# (and orphan the token of) an agent another request just enrolled. The record holds the
# registration (account, hostname, platform, enrolled_at: what endpoints.v1 carries) and the
# token's SHA-256.
_CREATE_AGENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'account_id', ARGV[1], 'hostname', ARGV[2], 'platform', ARGV[3],
  'token_sha256', ARGV[4], 'enrolled_at', ARGV[5])
return 1
"""

# Re-enrollment: swap the agent's token digest in one step (one field of one key), so the old
# token stops working exactly when the new one starts. An id unknown as an agent but holding
# another account's desired policy is another account's endpoint whose agent record was lost:
# never re-created here.
_REISSUE_TOKEN = """
local account = redis.call('HGET', KEYS[1], 'account_id')
if not account then
  local header = redis.call('GETRANGE', KEYS[2], 0, 25)
  local policy_account = false
  if header ~= '' then
    local id_len = tonumber(string.sub(header, 21, 23))
    local account_len = tonumber(string.sub(header, 24, 26))
    policy_account = redis.call('GETRANGE', KEYS[2], 26 + id_len, 25 + id_len + account_len)
  end
  if policy_account and policy_account ~= ARGV[1] then
    return 2
  end
  return 0
end
if account ~= ARGV[1] then
  return 2
end
redis.call('HSET', KEYS[1], 'token_sha256', ARGV[2], 'reenrolled_at', ARGV[3])
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


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def policy_record(
    sequence: int, policy_id: str, account_id: str, endpoint_id: str, signed_json: bytes
) -> bytes:
    """The stored form of a desired policy (see ``_SEQ_WIDTH``); the signed JSON compressed."""
    pid, account = policy_id.encode(), account_id.encode()
    if len(pid) > 999 or len(account) > 999 or not 0 <= sequence < 10**_SEQ_WIDTH:
        raise ValueError("policy id, account id or sequence too long for the policy record")
    header = f"{sequence:0{_SEQ_WIDTH}d}{len(pid):03d}{len(account):03d}".encode()
    body = deflate_raw(signed_json, _record_dictionary(endpoint_id, pid, account))
    return header + pid + account + _BODY_DEFLATE_V2 + body


def parse_policy_record(endpoint_id: str, raw: bytes) -> HeldPolicy:
    """A stored desired policy: its signed JSON inflated (v2), or as stored, gzipped (v1)."""
    at = _SEQ_WIDTH
    id_len, account_len = int(raw[at : at + 3]), int(raw[at + 3 : at + 6])
    at += 6
    pid, account = raw[at : at + id_len], raw[at + id_len : at + id_len + account_len]
    body = raw[at + id_len + account_len :]
    gzipped = body[:2] == _GZIP_MAGIC
    if not gzipped:
        if body[:1] != _BODY_DEFLATE_V2:
            raise ValueError(f"stored policy of {endpoint_id}: unknown body format {body[:1]!r}")
        try:
            body = inflate_raw(body[1:], _record_dictionary(endpoint_id, pid, account))
        except zlib.error as exc:
            raise ValueError(f"stored policy of {endpoint_id} does not inflate: {exc}") from exc
        # Raw deflate has no checksum: bytes that inflate wrongly fail the agent's signature check.
    return HeldPolicy(
        endpoint_id=endpoint_id,
        sequence=int(raw[:_SEQ_WIDTH]),
        policy_id=pid.decode(),
        account_id=account.decode(),
        body=body,
        gzipped=gzipped,
    )


def _record_dictionary(endpoint_id: str, policy_id: bytes, account_id: bytes) -> bytes:
    # The ids last: the nearest bytes of a dictionary are the cheapest to refer to.
    return _POLICY_DICTIONARY + account_id + b'"' + endpoint_id.encode() + b'"' + policy_id


_OUTCOMES = {0: StoreOutcome.STALE, 1: StoreOutcome.STORED, 2: StoreOutcome.WRONG_ACCOUNT}


class RedisScript:
    """A Lua script run by EVALSHA, alone or many in one pipeline (reloaded on NOSCRIPT)."""

    def __init__(self, redis: RedisClient, source: str) -> None:
        self._redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # how Redis names scripts

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call, sent as a plain command: a pipeline of one costs the client more CPU."""
        try:
            return await self._redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # A restarted or promoted node forgot the script: it ran nowhere, so run it again.
            await self._redis.script_load(self.source)
            return await self._redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def many(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """One pipeline (on a cluster: one per node, sent together) for every call."""
        replies = await self._pipeline(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # A restarted or promoted node forgot the script: it ran nowhere, so run it again.
            await self._redis.script_load(self.source)
            again = await self._pipeline([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _pipeline(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


class RedisPolicyStore:
    """Desired policy per endpoint: one string (sequence, ids, the signed policy JSON) in the
    endpoint's slot; its delivery state is its membership of the bucket's delivery sets."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self.keys = EnforcerKeys(keys)
        self._store = RedisScript(redis, _STORE_IF_NEWER)
        self._poll = RedisScript(redis, _POLL)
        self._record_delivery = RedisScript(redis, _RECORD_DELIVERY)

    async def store_if_newer(
        self, items: Sequence[PolicyToStore], lane: Lane
    ) -> list[StoreOutcome]:
        if not items:
            return []
        # One script per bucket of the batch (its endpoints share a slot and delivery sets),
        # all in one pipeline (per node on a cluster): a round trip per batch, not per command.
        groups: dict[str, tuple[list[str], list[Any], list[int]]] = {}
        for index, item in enumerate(items):
            policy = item.policy
            endpoint_id = policy.endpoint_id
            tag = slot_tag(TAG, endpoint_id)
            group = groups.get(tag)
            if group is None:
                keys = [self.keys.delivery(tag, state) for state in DELIVERY_STATES]
                group = groups[tag] = (keys, [self.keys.wake_of_tag(tag)], [])
            keys, args, indexes = group
            keys += [self.keys.policy_of(tag, endpoint_id), self.keys.agent_of(tag, endpoint_id)]
            args += [
                policy.sequence,
                policy_record(
                    policy.sequence,
                    policy.policy_id,
                    policy.account_id,
                    endpoint_id,
                    item.signed_json,
                ),
                policy.account_id,
                endpoint_id,
            ]
            indexes.append(index)
        replies = await self._store.many([(keys, args) for keys, args, _ in groups.values()])
        outcomes: list[StoreOutcome] = [StoreOutcome.STALE] * len(items)
        for (_, _, indexes), codes in zip(groups.values(), replies, strict=True):
            if len(codes) != len(indexes):
                raise RuntimeError(f"store script answered {len(codes)} codes for {len(indexes)}")
            for index, code in zip(indexes, codes, strict=True):
                outcomes[index] = _OUTCOMES[int(code)]
        return outcomes

    async def poll(self, endpoint_id: str, token_sha256: str, after: int) -> PollResult:
        reply = await self._poll(
            [
                self.keys.agent(endpoint_id),
                self.keys.policy(endpoint_id),
            ],
            [token_sha256, after],
        )
        code = int(reply[0])
        if code == 0:
            return PollResult(None, None)
        identity = AgentIdentity(agent_id=endpoint_id, account_id=_text(reply[1]))
        if code == 1 or not reply[2]:
            return PollResult(identity, None)
        return PollResult(identity, parse_policy_record(endpoint_id, _bytes(reply[2])))

    async def held(self, endpoint_id: str) -> HeldPolicy | None:
        raw = await self._redis.get(self.keys.policy(endpoint_id))
        return None if not raw else parse_policy_record(endpoint_id, _bytes(raw))

    async def record_delivery(
        self, endpoint_id: str, sequence: int, policy_id: str, status: str
    ) -> DesiredPolicyRef | None:
        reply = await self._record_delivery(
            [self.keys.policy(endpoint_id), *self.keys.deliveries(endpoint_id)],
            [sequence, policy_id, status, endpoint_id],
        )
        if not reply:
            return None
        held_sequence, held_policy_id = reply
        return DesiredPolicyRef(sequence=int(held_sequence), policy_id=_text(held_policy_id))

    async def delivery_counts(self) -> dict[str, int]:
        """Endpoints per delivery state, gathered from every bucket's sets."""
        pipe = self._redis.pipeline(transaction=False)
        for tag in bucket_tags(TAG):
            for state in DELIVERY_STATES:
                pipe.scard(self.keys.delivery(tag, state))
        counts = await pipe.execute()
        totals = dict.fromkeys(DELIVERY_STATES, 0)
        for index, count in enumerate(counts):
            totals[DELIVERY_STATES[index % len(DELIVERY_STATES)]] += int(count)
        return totals


class RedisAgentStore:
    """Enrolled agents by id (each record holds its token's digest, so a token is checked in the
    endpoint's slot), and the set of each account's endpoints (for the per-account cap)."""

    def __init__(self, redis: RedisClient, keys: Keys, max_per_account: int = 10_000) -> None:
        self._redis = redis
        self.keys = EnforcerKeys(keys)
        self._max_per_account = max_per_account
        self._count = RedisScript(redis, _COUNT_AGENT)
        self._create = RedisScript(redis, _CREATE_AGENT)
        self._reissue = RedisScript(redis, _REISSUE_TOKEN)

    async def create(self, record: AgentRecord) -> CreateOutcome:
        # Two slots, two steps: count the endpoint in its account (the cap), then write the
        # agent if its id is free. A crash between them leaves the id counted without an agent:
        # the cap errs on the safe side, and a re-enrollment of that id is not counted again.
        account_key = self.keys.account_agents(record.account_id)
        counted = int(await self._count([account_key], [record.agent_id, self._max_per_account]))
        if counted == 2:
            return CreateOutcome.ACCOUNT_FULL
        created = await self._create(
            [self.keys.agent(record.agent_id)],
            [
                record.account_id,
                record.hostname,
                record.platform,
                record.token_sha256,
                record.enrolled_at,
            ],
        )
        if int(created) == 1:
            return CreateOutcome.CREATED
        if counted == 3:
            await self._redis.srem(account_key, record.agent_id)
        return CreateOutcome.ID_TAKEN

    async def reissue_token(
        self, agent_id: str, account_id: str, token_sha256: str, reenrolled_at: str
    ) -> ReissueOutcome:
        code = await self._reissue(
            [self.keys.agent(agent_id), self.keys.policy(agent_id)],
            [account_id, token_sha256, reenrolled_at],
        )
        return _REISSUE_OUTCOMES[int(code)]

    async def delete(self, record: AgentRecord) -> None:
        await self._redis.delete(self.keys.agent(record.agent_id))
        await self._redis.srem(self.keys.account_agents(record.account_id), record.agent_id)

    async def identity(self, agent_id: str, token_sha256: str) -> AgentIdentity | None:
        stored, account_id = await self._redis.hmget(
            self.keys.agent(agent_id), ["token_sha256", "account_id"]
        )
        if stored is None or not hmac.compare_digest(_bytes(stored), token_sha256.encode()):
            return None
        return AgentIdentity(agent_id=agent_id, account_id=_text(account_id))


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

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._hash = EnforcerKeys(keys).enrollment_keys
        self._rotate = RedisScript(redis, _ROTATE_KEYS)
        self._revoke = RedisScript(redis, _REVOKE_KEY)

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
            [self._hash(record.account_id)], [record.key_id, body, record.created_at]
        )
        return sorted(_text(key_id) for key_id in revoked)

    async def revoke(
        self, account_id: str, key_id: str, revoked_at: str
    ) -> EnrollmentKeyRecord | None:
        raw = await self._revoke([self._hash(account_id)], [key_id, revoked_at])
        return None if raw is None else _key_record(raw)


class RedisEnrollmentRateLimiter:
    """Enrollment attempts per account in fixed one-minute windows (one counter per account)."""

    WINDOW_MS = 60_000

    def __init__(self, redis: RedisClient, keys: Keys, per_minute: int) -> None:
        self._key = EnforcerKeys(keys).enroll_rate
        self._per_minute = per_minute
        self._hit = RedisScript(redis, _RATE_HIT)

    async def hit(self, account_id: str) -> RateDecision:
        count, ttl_ms = await self._hit([self._key(account_id)], [self.WINDOW_MS])
        return RateDecision(
            allowed=int(count) <= self._per_minute,
            limit=self._per_minute,
            retry_after_s=max(1, -(-int(ttl_ms) // 1000)),
        )


async def load_or_create_dev_signing_key(
    redis: RedisClient, key: str, generate: str, *, timeout: float = 60.0
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
        except (RedisError, RedisClusterException, OSError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("waiting for redis to load the dev signing key: %r", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
