"""Redis stores: isolation state with request outcomes (atomic), and the two replicas' data."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from redis.exceptions import ResponseError

from services.isolation.adapters.codec import StoredDocumentError, pack, unpack
from services.isolation.adapters.event_codec import decode_event, encode_event
from services.isolation.adapters.redis_batch import BatchScript, RedisBatcher
from services.isolation.domain import (
    EndpointIsolation,
    EndpointRecord,
    RequestOutcome,
    Revocation,
)
from services.isolation.handlers import CommitConflictError, DuplicateRequest
from services.isolation.inventory import InventoryRow
from services.isolation.timeline import TIMELINE_MAX_EVENTS, TimelineEvent, timeline_event
from shared.messages import (
    Actor,
    AllowlistChanged,
    AllowlistEntry,
    AllowlistUsage,
    AllowlistUsageReported,
)
from shared.redis import Keys, RedisClient, bucket_tags, slot_tag

log = logging.getLogger(__name__)

# How long a request's outcome is remembered: a record redelivered later than this (its offset
# still uncommitted after a day, e.g. a partition held that long behind a record retried through
# an outage, then a crash) is applied again. Redeliveries come within minutes of the first
# delivery; a day covers an outage ridden out without an operator (HOSTISO_REQUEST_OUTCOME_TTL_S).
REQUEST_OUTCOME_TTL_S = 24 * 3600
# A revocation is remembered this long (and at most this many per account): far longer than a
# snapshot in flight takes, which is all the record is for (handlers.revoke_entries).
REVOCATION_TTL_S = 7 * 24 * 3600
REVOCATIONS_PER_ACCOUNT = 200
# Bytes of the request id's BLAKE2b digest that name its outcome in the endpoint's hash: a hash
# of 12-byte fields stays in Redis' compact encoding, and two of the endpoint's requests of one
# day sharing 96 bits is beyond any practical chance.
_REQUEST_FIELD_BYTES = 12

# Request outcomes of one endpoint live in one hash (KEYS[2] of _COMMIT): field = the request
# id's digest, value = '<expiry, epoch s><mark>' with mark 'n' (changed nothing), 'p' (issued a
# policy whose command has not left yet; the whole outcome, to send again, waits in KEYS[4]) or
# 's' (issued, command acknowledged). A few bytes per request instead of a key holding the whole
# command. Earlier versions kept one key per request (KEYS[4], the same name, with the outcome
# JSON) and a 'sent' marker key (KEYS[6]): both are still read until they expire.
#
# The state of an endpoint is one string, ``<rev>:<document>`` (the document packed by ``codec``
# with the endpoint id as its context): a revision and a document of ~240 B as a hash would leave
# Redis' compact encoding (values over 64 B) and cost twice the bytes. Earlier versions stored a
# hash of ``doc`` and ``rev``: read as the same pair, replaced by the string at its next write.
#
# State and request outcome are written in one script: a crash can never store one without the
# other, and the revision check makes concurrent writers (two lanes, status, other instances)
# retry instead of overwriting each other. Every key it touches carries the endpoint's hash tag
# (one Redis Cluster slot): the account's isolated/pending set is kept per endpoint bucket.
# The endpoint's timeline (KEYS[5], bounded) gets the event of the change in the same script, so
# it holds exactly the changes that were stored: no lost entry, no entry for a refused commit.
# ARGV[7] = '1' when the write carries a request outcome: without one KEYS[2], KEYS[4] and KEYS[6]
# are a placeholder inside the service's namespace and slot (never read or written), because
# Redis checks the ACL key patterns of every declared key and an empty name matches none.
# Expired outcomes are dropped from the hash at the endpoint's next request (the hash holds the
# requests of one TTL: a handful), and the whole hash expires a TTL after its last write. ARGV[12]
# is the writer's time (epoch s).
_COMMIT = """
if ARGV[7] == '1' then
  local mark = redis.call('HGET', KEYS[2], ARGV[10])
  if mark then
    return {'dup', string.sub(mark, -1), redis.call('GET', KEYS[4]) or '', 0}
  end
  if redis.call('EXISTS', KEYS[4]) == 1 then
    return {'dup', '', redis.call('GET', KEYS[4]), redis.call('EXISTS', KEYS[6])}
  end
end
local rev = '0'
local held = redis.call('TYPE', KEYS[1])['ok']
if held == 'string' then
  rev = string.match(redis.call('GETRANGE', KEYS[1], 0, 20), '^(%d+):') or '0'
elseif held == 'hash' then
  rev = redis.call('HGET', KEYS[1], 'rev') or '0'
end
if rev ~= ARGV[1] then
  return {'conflict', rev}
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], tostring(tonumber(rev) + 1) .. ':' .. ARGV[2])
  if ARGV[5] == '1' then
    redis.call('SADD', KEYS[3], ARGV[6])
  else
    redis.call('SREM', KEYS[3], ARGV[6])
  end
end
if ARGV[7] == '1' then
  local now = tonumber(ARGV[12])
  local kept = redis.call('HGETALL', KEYS[2])
  for i = 1, #kept, 2 do
    if (tonumber(string.sub(kept[i + 1], 1, -2)) or 0) <= now then
      redis.call('HDEL', KEYS[2], kept[i])
    end
  end
  local ttl = tonumber(ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[10], tostring(now + ttl) .. ARGV[11])
  redis.call('EXPIRE', KEYS[2], ttl)
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[4], ARGV[3], 'EX', ttl)
  end
end
if ARGV[2] ~= '' and ARGV[8] ~= '' then
  redis.call('LPUSH', KEYS[5], ARGV[8])
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[9]) - 1)
end
return {'ok', ''}
"""

# A request's earlier outcome (mark, the pending or earlier-format outcome, the earlier format's
# sent marker) and the endpoint's state: one round trip. Missing values come back as '' (a Lua
# nil would cut the reply short).
_BEGIN = """
local mark = redis.call('HGET', KEYS[1], ARGV[1])
local outcome, sent = '', ''
if mark then
  mark = string.sub(mark, -1)
  if mark == 'p' then
    outcome = redis.call('GET', KEYS[2]) or ''
  end
else
  mark = ''
  outcome = redis.call('GET', KEYS[2]) or ''
  if outcome ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then
    sent = '1'
  end
end
local state = ''
local held = redis.call('TYPE', KEYS[3])['ok']
if held == 'string' then
  state = redis.call('GET', KEYS[3])
elseif held == 'hash' then
  local old = redis.call('HMGET', KEYS[3], 'doc', 'rev')
  if old[1] then
    state = (old[2] or '0') .. ':' .. old[1]
  end
end
return {mark, outcome, sent, state}
"""

# The command left: the outcome becomes its 's' mark and the whole outcome kept to send it again
# (or an earlier version's outcome key) goes.
_MARK_SENT = """
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], tostring(tonumber(ARGV[3]) + ttl) .. 's')
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('DEL', KEYS[2])
return 1
"""

# Events may be redelivered or replayed from the start: only a newer version replaces the replica.
_APPLY_SETTINGS = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'doc', ARGV[2])
return 1
"""


# The account's inventory: a sorted set of index positions (hostname, endpoint id; all scores 0,
# so ordered by bytes) and a hash of rows, both tagged by the account (one slot per account, no
# global key). A row is replaced only by a registration at least as new as the stored one, so a
# replica replaying the topic from the start never moves a row back in time.
_INDEX_ENDPOINT = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  local row = cjson.decode(old)
  if tonumber(row['v']) > tonumber(ARGV[4]) then
    return 0
  end
  if row['k'] ~= ARGV[2] then
    redis.call('ZREM', KEYS[1], row['k'])
  end
end
redis.call('ZADD', KEYS[1], 0, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

_UNINDEX_ENDPOINT = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  redis.call('ZREM', KEYS[1], cjson.decode(old)['k'])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
"""

# One page of the index and its rows in one round trip (read-only, one slot).
_SCAN_INDEX = """
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local rows = {}
for i, member in ipairs(members) do
  local sep = string.find(member, '\\0', 1, true)
  local endpoint_id = string.sub(member, sep + 1)
  rows[i] = redis.call('HGET', KEYS[2], endpoint_id) or ''
end
return rows
"""

# Usage counters of one endpoint (one key, its slot): KEYS[1] a hash {seq, c:<entry> -> json},
# KEYS[2] the ids of the messages already added (bounded). ARGV[1] sequence, ARGV[2] message
# id, ARGV[3] JSON list of {k, p, b, t}. A newer sequence starts from zero; an older one is
# ignored, so a superseded policy's counts never mix into the policy in force.
_ADD_USAGE = """
if redis.call('LPOS', KEYS[2], ARGV[2]) then
  return 0
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local new = tonumber(ARGV[1])
if new < seq then
  return 0
end
if new > seq then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'seq', ARGV[1])
end
for _, c in ipairs(cjson.decode(ARGV[3])) do
  local field = 'c:' .. c['k']
  local old = redis.call('HGET', KEYS[1], field)
  local p, b, t = c['p'], c['b'], c['t']
  if old then
    local o = cjson.decode(old)
    p = p + o['p']
    b = b + o['b']
    if t == '' or (o['t'] ~= '' and o['t'] > t) then
      t = o['t']
    end
  end
  redis.call('HSET', KEYS[1], field, cjson.encode({p = p, b = b, t = t}))
end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return 1
"""

# Message ids remembered per endpoint against a redelivered report being added twice.
USAGE_IDS_KEPT = 64
USAGE_TTL_S = 30 * 24 * 3600

_TAG = "iso"
_INVENTORY_TAG = "inv"


class RedisIsolationStore:
    """Isolation state per endpoint (with a revision) and the account's isolated/pending set.

    Keys of one endpoint share its hash tag (``{iso<bucket>}``); the account's set of isolated
    or pending endpoints is split by that bucket, so the commit script stays in one slot and
    ``active_endpoints`` gathers the account's members from every bucket. State documents and
    timeline events are stored packed (``codec``); those of earlier versions read as they are.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        batcher: RedisBatcher | None = None,
        *,
        outcome_ttl_s: int = REQUEST_OUTCOME_TTL_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._batch = batcher or RedisBatcher(redis)
        self._outcome_ttl_s = outcome_ttl_s
        self._commit = BatchScript(_COMMIT)
        self._begin = BatchScript(_BEGIN)
        self._mark_sent = BatchScript(_MARK_SENT)
        self._states = StateDecoder()

    def _state_key(self, endpoint_id: str) -> str:
        return self._keys("isolation", slot_tag(_TAG, endpoint_id), "state", endpoint_id)

    def _active_key(self, endpoint_id: str, account_id: str) -> str:
        return self._keys("isolation", slot_tag(_TAG, endpoint_id), "active", account_id)

    def _requests_key(self, endpoint_id: str) -> str:
        return self._keys("isolation", slot_tag(_TAG, endpoint_id), "requests", endpoint_id)

    def _request_key(self, endpoint_id: str, request_key: str) -> str:
        return self._keys("isolation", slot_tag(_TAG, endpoint_id), "request", request_key)

    def _sent_key(self, endpoint_id: str, request_key: str) -> str:
        return self._keys("isolation", slot_tag(_TAG, endpoint_id), "request-sent", request_key)

    def _timeline_key(self, endpoint_id: str) -> str:
        return self._keys("isolation", slot_tag(_TAG, endpoint_id), "timeline", endpoint_id)

    async def timeline(self, endpoint_id: str, count: int) -> list[TimelineEvent]:
        """The endpoint's newest ``count`` timeline events, newest first."""
        raw = await self._batch.command("LRANGE", self._timeline_key(endpoint_id), 0, count - 1)
        return [decode_event(item) for item in raw or []]

    async def load(self, endpoint_id: str) -> tuple[EndpointIsolation | None, int]:
        key = self._state_key(endpoint_id)
        try:
            stored = await self._batch.command("GET", key)
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            stored = _earlier_state(await self._batch.command("HMGET", key, "doc", "rev"))
        return self._isolation(endpoint_id, stored)

    async def begin(
        self, endpoint_id: str, account_id: str, request_key: str
    ) -> tuple[RequestOutcome | None, EndpointIsolation | None, int]:
        """What the request already did (if anything), and the endpoint's state and revision."""
        mark, raw, sent, stored = await self._batch.script(
            self._begin,
            [
                self._requests_key(endpoint_id),
                self._request_key(endpoint_id, request_key),
                self._state_key(endpoint_id),
                self._sent_key(endpoint_id, request_key),
            ],
            [_request_field(request_key)],
        )
        current, revision = self._isolation(endpoint_id, stored or None)
        prior = _outcome(endpoint_id, account_id, mark, raw, sent=bool(sent))
        return prior, current, revision

    async def load_many(self, endpoint_ids: list[str]) -> list[EndpointIsolation]:
        if not endpoint_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for endpoint_id in endpoint_ids:
            pipe.get(self._state_key(endpoint_id))
        replies = await pipe.execute(raise_on_error=False)
        earlier = [i for i, r in enumerate(replies) if _wrong_type(r)]
        if earlier:
            # States an earlier version stored (a hash of doc and rev), not rewritten since.
            pipe = self._redis.pipeline(transaction=False)
            for i in earlier:
                pipe.hmget(self._state_key(endpoint_ids[i]), "doc", "rev")
            for i, reply in zip(earlier, await pipe.execute(), strict=True):
                replies[i] = _earlier_state(reply)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        out = [self._isolation(e, r)[0] for e, r in zip(endpoint_ids, replies, strict=True)]
        return [isolation for isolation in out if isolation is not None]

    async def mark_sent(self, endpoint_id: str, request_key: str) -> None:
        """The command left: a redelivery of the request need not send it again."""
        await self._batch.script(
            self._mark_sent,
            [self._requests_key(endpoint_id), self._request_key(endpoint_id, request_key)],
            [_request_field(request_key), str(self._outcome_ttl_s), _now_s()],
        )

    async def commit(
        self,
        current_rev: int,
        isolation: EndpointIsolation,
        *,
        changed: bool,
        request_key: str | None = None,
        outcome: RequestOutcome | None = None,
    ) -> None:
        """Store the new state (if ``changed``) and the request outcome, only if unchanged since read."""
        endpoint_id = isolation.endpoint_id
        unused = self._keys("isolation", slot_tag(_TAG, endpoint_id), "no-request")
        with_request = request_key is not None and outcome is not None
        keys = [
            self._state_key(endpoint_id),
            self._requests_key(endpoint_id) if request_key else unused,
            self._active_key(endpoint_id, isolation.account_id),
            self._request_key(endpoint_id, request_key) if request_key else unused,
            self._timeline_key(endpoint_id),
            self._sent_key(endpoint_id, request_key) if request_key else unused,
        ]
        event = (
            timeline_event(isolation, issued=outcome is not None and outcome.kind == "policy")
            if changed
            else None
        )
        # A policy keeps its whole outcome (the command to send again) until the command left.
        pending = outcome is not None and outcome.kind == "policy"
        doc = self._states.encode(isolation) if changed else b""
        args: list[str | bytes] = [
            str(current_rev),
            doc,
            outcome.model_dump_json() if outcome and pending else "",
            str(self._outcome_ttl_s),
            "1" if isolation.isolated_or_pending else "0",
            isolation.endpoint_id,
            "1" if with_request else "0",
            encode_event(event) if event else "",
            str(TIMELINE_MAX_EVENTS),
            _request_field(request_key) if request_key else "",
            "p" if pending else "n",
            _now_s(),
        ]
        reply = await self._batch.script(self._commit, keys, args)
        status = reply[0]
        if status == b"dup":
            _, mark, raw, sent = reply
            prior = _outcome(endpoint_id, isolation.account_id, mark, raw, sent=bool(sent))
            if prior is None:  # unreachable: a dup always carries a mark or an outcome
                raise CommitConflictError(endpoint_id)
            raise DuplicateRequest(prior)
        if status == b"conflict":
            raise CommitConflictError(isolation.endpoint_id)
        if changed:
            self._states.remember(endpoint_id, doc, isolation)

    async def active_endpoints(self, account_id: str) -> list[str]:
        pipe = self._redis.pipeline(transaction=False)
        for tag in bucket_tags(_TAG):
            pipe.smembers(self._keys("isolation", tag, "active", account_id))
        members: set[str] = set()
        for bucket in await pipe.execute():
            members.update(m.decode() if isinstance(m, bytes) else str(m) for m in bucket)
        return sorted(members)

    def _isolation(
        self, endpoint_id: str, stored: bytes | None
    ) -> tuple[EndpointIsolation | None, int]:
        """The state and revision of a stored ``<rev>:<document>`` value."""
        if not stored:
            return None, 0
        rev, colon, doc = stored.partition(b":")
        if not colon or not rev.isdigit():
            raise StoredDocumentError(f"stored state of {endpoint_id} has no revision")
        return self._states.decode(endpoint_id, doc), int(rev)


class StateDecoder:
    """Packs state documents and decodes stored ones, remembering the newest decodes.

    Decoding a state validates its frozen policy again, and checking each address is most of the
    service's CPU per request; the same stored bytes are read several times (the REST check, the
    request, the agent's report, the status reads). The memo is keyed by the exact bytes read
    from Redis, so it can never answer anything Redis does not hold: it only skips parsing bytes
    already parsed (the models are frozen). Bounded, oldest first out.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._decoded: OrderedDict[tuple[str, bytes], EndpointIsolation] = OrderedDict()

    def encode(self, isolation: EndpointIsolation) -> bytes:
        # The endpoint id, which the key names, is the document's context (codec tag 2).
        return pack("state", isolation.model_dump_json().encode(), isolation.endpoint_id.encode())

    def remember(self, endpoint_id: str, stored: bytes, isolation: EndpointIsolation) -> None:
        """``stored`` (just written) is ``isolation``: its next read need not parse it."""
        self._put((endpoint_id, stored), isolation)

    def decode(self, endpoint_id: str, stored: bytes) -> EndpointIsolation:
        memo = (endpoint_id, stored)
        found = self._decoded.get(memo)
        if found is not None:
            self._decoded.move_to_end(memo)
            return found
        document = unpack("state", stored, endpoint_id.encode())
        isolation = EndpointIsolation.model_validate_json(document)
        self._put(memo, isolation)
        return isolation

    def _put(self, memo: tuple[str, bytes], isolation: EndpointIsolation) -> None:
        self._decoded[memo] = isolation
        self._decoded.move_to_end(memo)
        while len(self._decoded) > self._size:
            self._decoded.popitem(last=False)


class AllowlistDecoder:
    """Decodes stored allowlist replicas, remembering the newest decodes by their exact bytes.

    Every standard isolation reads its account's allowlist; parsing it again validates each
    entry (~50 µs for 5 entries, ~1 ms for 100) though it changes only when settings publish a
    new version. Keyed by the bytes Redis answered, the memo can never answer anything Redis
    does not hold (the model is frozen). Bounded, oldest first out (256 accounts: a few MiB at
    most for allowlists of 100 entries).
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._decoded: OrderedDict[bytes, AllowlistChanged] = OrderedDict()

    def decode(self, stored: bytes) -> AllowlistChanged:
        found = self._decoded.get(stored)
        if found is not None:
            self._decoded.move_to_end(stored)
            return found
        allowlist = AllowlistChanged.model_validate_json(stored)
        self._decoded[stored] = allowlist
        while len(self._decoded) > self._size:
            self._decoded.popitem(last=False)
        return allowlist


# One key per account (its own slot): add the revocation scored by its settings version, keep the
# newest ones, and renew the expiry.
_RECORD_REVOCATION = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class RedisUsageStore:
    """The endpoint's usage counters for one sequence, beside its state (same hash tag)."""

    def __init__(self, redis: RedisClient, keys: Keys, batcher: RedisBatcher | None = None) -> None:
        self._keys = keys
        self._batch = batcher or RedisBatcher(redis)
        self._add = BatchScript(_ADD_USAGE)

    def _key(self, endpoint_id: str, part: str) -> str:
        return self._keys("isolation", slot_tag(_TAG, endpoint_id), part, endpoint_id)

    async def add(self, report: AllowlistUsageReported) -> bool:
        items = [
            {
                "k": usage_key(c),
                "p": c.packets,
                "b": c.bytes,
                # RFC 3339 UTC with a fixed width: strings compare as times in the script.
                "t": "" if c.last_seen is None else _utc_text(c.last_seen),
            }
            for c in report.counters
        ]
        added = await self._batch.script(
            self._add,
            [self._key(report.endpoint_id, "usage"), self._key(report.endpoint_id, "usage-ids")],
            [
                report.sequence,
                report.id,
                orjson.dumps(items).decode() if items else "[]",
                USAGE_IDS_KEPT,
                USAGE_TTL_S,
            ],
        )
        return bool(added)

    async def usage(self, endpoint_id: str) -> tuple[int, list[AllowlistUsage]]:
        raw = await self._batch.command("HGETALL", self._key(endpoint_id, "usage"))
        fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
        sequence = int(fields.pop("seq", "0") or 0)
        counters: list[AllowlistUsage] = []
        for field, value in sorted(fields.items()):
            if not field.startswith("c:"):
                continue
            address, protocol, ports = field[2:].split("|")
            doc = orjson.loads(value)
            counters.append(
                AllowlistUsage(
                    address=address,
                    protocol=protocol,
                    ports=tuple(int(p) for p in ports.split(",") if p),
                    packets=int(doc["p"]),
                    bytes=int(doc["b"]),
                    last_seen=datetime.fromisoformat(doc["t"]) if doc["t"] else None,
                )
            )
        return sequence, counters


def usage_key(usage: AllowlistUsage) -> str:
    """An entry's identity in the counters: address, protocol and ports."""
    return f"{usage.address}|{usage.protocol}|{','.join(str(p) for p in sorted(usage.ports))}"


def _utc_text(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRevocationLog:
    """The account's recent revocations, a sorted set scored by the revoking settings version."""

    def __init__(self, redis: RedisClient, keys: Keys, batcher: RedisBatcher | None = None) -> None:
        self._keys = keys
        self._batch = batcher or RedisBatcher(redis)
        self._record = BatchScript(_RECORD_REVOCATION)

    def _key(self, account_id: str) -> str:
        return self._keys("isolation", "revocations", account_id)

    async def record(self, revocation: Revocation) -> None:
        member = orjson.dumps(
            {
                "revocation_id": revocation.revocation_id,
                "entry": revocation.entry.model_dump(mode="json"),
                "settings_version": revocation.settings_version,
                "reason": revocation.reason,
                "requested_by": revocation.requested_by.model_dump(mode="json"),
            },
            option=orjson.OPT_SORT_KEYS,
        )
        await self._batch.script(
            self._record,
            [self._key(revocation.account_id)],
            [
                str(revocation.settings_version),
                member,
                str(REVOCATIONS_PER_ACCOUNT),
                str(REVOCATION_TTL_S),
            ],
        )

    async def since(self, account_id: str, settings_version: int) -> list[Revocation]:
        """Revocations made at a settings version above ``settings_version``."""
        raw = await self._batch.command(
            "ZRANGEBYSCORE", self._key(account_id), f"({settings_version}", "+inf"
        )
        found: list[Revocation] = []
        for item in raw or []:
            doc = orjson.loads(item)
            found.append(
                Revocation(
                    revocation_id=doc["revocation_id"],
                    account_id=account_id,
                    entry=AllowlistEntry.model_validate(doc["entry"]),
                    settings_version=int(doc["settings_version"]),
                    reason=doc["reason"],
                    requested_by=Actor.model_validate(doc["requested_by"]),
                )
            )
        return found


class RedisReplicaStore:
    """Replica data rebuilt from the compacted topics: allowlist per account, endpoint registry."""

    def __init__(self, redis: RedisClient, keys: Keys, batcher: RedisBatcher | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._batch = batcher or RedisBatcher(redis)
        self._apply_settings: Any = redis.register_script(_APPLY_SETTINGS)
        self._index_endpoint: Any = redis.register_script(_INDEX_ENDPOINT)
        self._unindex_endpoint: Any = redis.register_script(_UNINDEX_ENDPOINT)
        self._scan_index: Any = redis.register_script(_SCAN_INDEX)
        self._allowlists = AllowlistDecoder()

    async def apply_settings(self, event: AllowlistChanged) -> bool:
        key = self._keys("isolation", "settings", event.account_id)
        applied = await self._apply_settings(
            keys=[key], args=[str(event.version), event.model_dump_json()]
        )
        return bool(applied)

    async def settings(self, account_id: str) -> AllowlistChanged | None:
        raw = await self._batch.command(
            "HGET", self._keys("isolation", "settings", account_id), "doc"
        )
        return None if raw is None else self._allowlists.decode(raw)

    def _inventory_keys(self, account_id: str) -> list[str]:
        tag = slot_tag(_INVENTORY_TAG, account_id)
        return [
            self._keys("isolation", tag, "inventory", account_id),
            self._keys("isolation", tag, "inventory-rows", account_id),
        ]

    async def index_endpoint(self, row: InventoryRow) -> bool:
        """Put ``row`` in its account's inventory unless a newer registration is there."""
        stored = row.model_dump(mode="json") | {"k": row.sort_key, "v": row.version_ms}
        applied = await self._index_endpoint(
            keys=self._inventory_keys(row.account_id),
            args=[row.endpoint_id, row.sort_key, orjson.dumps(stored), str(row.version_ms)],
        )
        return bool(applied)

    async def unindex_endpoint(self, account_id: str, endpoint_id: str) -> None:
        """Drop the endpoint from an account it no longer belongs to."""
        await self._unindex_endpoint(keys=self._inventory_keys(account_id), args=[endpoint_id])

    async def scan(self, account_id: str, after: str | None, count: int) -> list[InventoryRow]:
        start = "-" if after is None else "(" + after
        raw = await self._scan_index(keys=self._inventory_keys(account_id), args=[start, count])
        return [InventoryRow.model_validate_json(r) for r in raw if r]

    async def put_endpoint(self, endpoint: EndpointRecord) -> None:
        await self._redis.set(
            self._keys("isolation", "endpoint", endpoint.endpoint_id), endpoint.model_dump_json()
        )

    async def endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        raw = await self._batch.command("GET", self._keys("isolation", "endpoint", endpoint_id))
        return None if raw is None else EndpointRecord.model_validate_json(raw)


def _now_s() -> str:
    # The writer's clock, not Redis TIME (outside the services' ACL): expiries are hours long.
    return str(int(time.time()))


def _request_field(request_key: str) -> bytes:
    return hashlib.blake2b(request_key.encode(), digest_size=_REQUEST_FIELD_BYTES).digest()


def _outcome(
    endpoint_id: str, account_id: str, mark: bytes, raw: bytes, *, sent: bool
) -> RequestOutcome | None:
    """The stored outcome: a mark (with the whole outcome while 'p'), or an earlier format's."""
    if mark in (b"s", b"n"):
        kind: Literal["policy", "noop"] = "policy" if mark == b"s" else "noop"
        return RequestOutcome(
            kind=kind, endpoint_id=endpoint_id, account_id=account_id, sent=kind == "policy"
        )
    if raw:
        # 'p' (not sent yet) or an earlier version's outcome key with its own sent marker.
        prior = RequestOutcome.model_validate_json(raw)
        return prior.model_copy(update={"sent": sent and mark != b"p"})
    if mark == b"p":
        # The outcome to send again expired with the request (only after a TTL): nothing to send.
        log.warning(
            "request outcome expired before its command was sent",
            extra={"endpoint_id": endpoint_id},
        )
        return RequestOutcome(kind="policy", endpoint_id=endpoint_id, account_id=account_id)
    return None


def _wrong_type(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def _earlier_state(reply: list[Any]) -> bytes | None:
    """An earlier version's state (a hash of ``doc`` and ``rev``) as a ``<rev>:<doc>`` value."""
    doc, rev = reply
    if doc is None:
        return None
    rev_text = rev if isinstance(rev, bytes) else str(rev or 0).encode()
    return rev_text + b":" + (doc if isinstance(doc, bytes) else doc.encode())
