"""Redis storage: allowlist state, version, history and outbox change in one single-slot Lua script."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from services.settings.domain import Allowlist, Change, history_delta
from shared.messages import AllowlistChanged, AuditRecorded
from shared.redis import RedisClient, bucket_of

log = logging.getLogger(__name__)

KeyBuilder = Callable[..., str]

DEFAULT_SHARDS = 16

# Compare-and-set on the version: the state, the version, the history record and the outbox
# entry are written by one script, so Redis never holds a half-applied change, and the shard's
# outbox stream order is the commit order (hence each account's version order: an account
# belongs to exactly one shard). Every key carries the shard's hash tag: one Redis Cluster slot.
# History is a sorted set scored by version (a page is one range read), trimmed here to the
# newest ARGV[9] records so it is bounded per account whatever the write rate.
_COMMIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, tostring(current)}
end
local keep = tonumber(ARGV[9])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(keep + 1))
local id = redis.call('XADD', KEYS[4], '*',
  'account', ARGV[5], 'version', ARGV[2], 'event', ARGV[6], 'audit', ARGV[7], 'at', ARGV[8])
return {1, id}
"""

# Only the relay that still holds the shard's lease may mark its entries published; a relay that
# lost it leaves them for the new leader, which republishes them (duplicates, never gaps). The
# lease, the outbox and the accounts' published versions all live in the shard's slot.
_MARK_PUBLISHED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local n = tonumber(ARGV[2])
for i = 1, n do
  redis.call('XDEL', KEYS[2], ARGV[2 + i])
end
for j = 3, #KEYS do
  local v = tonumber(ARGV[2 + n + (j - 2)])
  local cur = tonumber(redis.call('GET', KEYS[j]) or '0')
  if v > cur then
    redis.call('SET', KEYS[j], ARGV[2 + n + (j - 2)])
  end
end
return 1
"""

# Take a free lease, or keep one this relay already holds (a relay that lost track of its lease
# after a Redis error gets it back at once instead of waiting for it to expire).
_ACQUIRE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def shard_tag(shard: int) -> str:
    """The hash tag of every key of ``shard``: its accounts, its outbox and its relay lease."""
    return "{" + f"set{shard:02d}" + "}"


@dataclass(frozen=True)
class OutboxRecord:
    """One committed change waiting to be published, in its shard's commit order."""

    stream_id: bytes
    account_id: str
    version: int
    event: bytes
    audit: bytes
    committed_at_ms: int


class RedisAllowlistStore:
    """The allowlist, its history and the transactional outbox, under ``<prefix>settings:``.

    Accounts are split into ``shards`` (``crc32(account_id) % shards``). Every key of a shard
    carries its hash tag (``{set07}``): the accounts' state, version, history and published
    version, the shard's outbox stream and its relay lease. So each script touches one slot
    on Redis Cluster, there is no global hot key, and the same layout runs on a single Redis.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: KeyBuilder,
        history_max_records: int = 1000,
        shards: int = DEFAULT_SHARDS,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self._redis = redis
        self._keys = keys
        self._history_max_records = history_max_records
        self.shards = shards
        # redis-py's Script objects run EVALSHA and load the script again on NOSCRIPT (a
        # restarted node, a promoted replica); on Redis Cluster SCRIPT LOAD reaches every master.
        self._commit = redis.register_script(_COMMIT)
        self._mark = redis.register_script(_MARK_PUBLISHED)
        self._acquire = redis.register_script(_ACQUIRE_LEASE)
        self._renew = redis.register_script(_RENEW_LEASE)

    def shard_of(self, account_id: str) -> int:
        """The account's shard (CRC-32, stable across processes and languages)."""
        return bucket_of(account_id, self.shards)

    def outbox_key(self, shard: int) -> str:
        return self._keys(shard_tag(shard), "outbox")

    def lease_key(self, shard: int) -> str:
        return self._keys(shard_tag(shard), "relay", "leader")

    def _account_key(self, account_id: str, part: str) -> str:
        return self._keys(shard_tag(self.shard_of(account_id)), "allowlist", account_id, part)

    async def load(self, account_id: str) -> Allowlist:
        raw = await self._redis.get(self._account_key(account_id, "state"))
        if raw is None:
            return Allowlist(account_id=account_id)
        return Allowlist.model_validate_json(raw)

    def commit_keys(self, account_id: str) -> list[str]:
        """The keys the commit script of ``account_id`` touches (all in the shard's slot)."""
        return [
            self._account_key(account_id, "version"),
            self._account_key(account_id, "state"),
            self._account_key(account_id, "history-by-version"),
            self.outbox_key(self.shard_of(account_id)),
        ]

    async def commit(self, change: Change, event: AllowlistChanged, audit: AuditRecorded) -> bool:
        """Apply ``change`` if the stored version is still ``change.before.version``."""
        account_id = change.after.account_id
        before, after = history_delta(change)
        history = {
            "version": change.after.version,
            "action": change.action,
            "actor": event.changed_by.model_dump(mode="json"),
            "at": event.occurred_at.isoformat(),
            "detail": change.detail,
            "before": before,
            "after": after,
            "event_id": event.id,
        }
        result: list[Any] = await self._commit(
            keys=self.commit_keys(account_id),
            args=[
                change.before.version,
                change.after.version,
                change.after.model_dump_json(),
                orjson.dumps(history),
                account_id,
                event.to_bytes(),
                audit.to_bytes(),
                int(time.time() * 1000),
                self._history_max_records,
            ],
        )
        return int(result[0]) == 1

    async def history(
        self, account_id: str, *, limit: int, before_version: int | None = None
    ) -> list[dict[str, Any]]:
        """At most ``limit`` records with a version below ``before_version``, newest first."""
        raw: list[bytes] = await self._redis.zrevrangebyscore(
            self._account_key(account_id, "history-by-version"),
            "+inf" if before_version is None else f"({before_version}",
            "-inf",
            start=0,
            num=limit,
        )  # type: ignore[assignment]
        return [orjson.loads(item) for item in raw]

    async def history_size(self, account_id: str) -> int:
        """How many history records the account holds (bounded by the configured maximum)."""
        return int(await self._redis.zcard(self._account_key(account_id, "history-by-version")))

    async def published_version(self, account_id: str) -> int:
        raw = await self._redis.get(self._account_key(account_id, "published"))
        return int(raw) if raw is not None else 0

    async def pending(self, shard: int, count: int) -> list[OutboxRecord]:
        """The oldest unpublished outbox entries of ``shard``, in commit order."""
        rows: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrange(
            self.outbox_key(shard), "-", "+", count=count
        )  # type: ignore[assignment]
        return [
            OutboxRecord(
                stream_id=stream_id,
                account_id=fields[b"account"].decode(),
                version=int(fields[b"version"]),
                event=fields[b"event"],
                audit=fields[b"audit"],
                committed_at_ms=int(fields[b"at"]),
            )
            for stream_id, fields in rows
        ]

    async def shard_depth(self, shard: int) -> int:
        return int(await self._redis.xlen(self.outbox_key(shard)))

    async def shard_depths(self, shards: list[int]) -> list[int]:
        """Unpublished entries of each of ``shards`` (one single-key command each, pipelined)."""
        if not shards:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for shard in shards:
            pipe.xlen(self.outbox_key(shard))
        return [int(depth) for depth in await pipe.execute()]

    async def outbox_depth(self) -> int:
        """Unpublished entries of every shard."""
        return sum(await self.shard_depths(list(range(self.shards))))

    async def lease_holders(self) -> list[str | None]:
        """Per shard, the token of the relay holding its lease (``None``: nobody relays it)."""
        pipe = self._redis.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.get(self.lease_key(shard))
        raw: list[bytes | None] = await pipe.execute()
        return [None if value is None else value.decode() for value in raw]

    def mark_keys(self, shard: int, account_ids: list[str]) -> list[str]:
        """The keys the mark script of ``shard`` touches (all in the shard's slot)."""
        foreign = [a for a in account_ids if self.shard_of(a) != shard]
        if foreign:
            raise ValueError(f"accounts {foreign!r} are not in shard {shard}")
        return [
            self.lease_key(shard),
            self.outbox_key(shard),
            *(self._account_key(a, "published") for a in account_ids),
        ]

    async def mark_published(
        self, shard: int, lease_token: str, records: list[OutboxRecord]
    ) -> bool:
        newest: dict[str, int] = {}
        for record in records:
            newest[record.account_id] = max(newest.get(record.account_id, 0), record.version)
        accounts = list(newest)
        result = await self._mark(
            keys=self.mark_keys(shard, accounts),
            args=[
                lease_token,
                len(records),
                *(r.stream_id for r in records),
                *(newest[a] for a in accounts),
            ],
        )
        return int(result) == 1

    async def acquire_lease(self, shard: int, token: str, lease_ms: int) -> bool:
        return int(await self._acquire(keys=[self.lease_key(shard)], args=[token, lease_ms])) == 1

    async def renew_lease(self, shard: int, token: str, lease_ms: int) -> bool:
        return int(await self._renew(keys=[self.lease_key(shard)], args=[token, lease_ms])) == 1

    async def acquire_leases(self, shards: list[int], token: str, lease_ms: int) -> list[bool]:
        """``acquire_lease`` of several shards in one pipeline (one round trip per node)."""
        return await self._lease_each(self._acquire, shards, token, lease_ms)

    async def renew_leases(self, shards: list[int], token: str, lease_ms: int) -> list[bool]:
        """``renew_lease`` of several shards in one pipeline; a shard whose script failed is
        reported as not renewed (fail closed)."""
        return await self._lease_each(self._renew, shards, token, lease_ms)

    async def _lease_each(
        self, script: AsyncScript, shards: list[int], token: str, lease_ms: int
    ) -> list[bool]:
        # Each script is single-key and idempotent for its token, so running the batch again
        # after a NOSCRIPT (a restarted node, a promoted replica) changes nothing already done.
        if not shards:
            return []
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for shard in shards:
                # execute_command: redis-py's cluster pipeline blocks its evalsha() helper, not
                # the command (each one names its single key, so it goes to that key's node).
                pipe.execute_command(
                    "EVALSHA", script.sha, 1, self.lease_key(shard), token, lease_ms
                )
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await self._redis.script_load(script.script)
                continue
            break
        for shard, result in zip(shards, results, strict=True):
            if isinstance(result, Exception):
                log.warning("relay lease script failed: %r", result, extra={"shard": shard})
        return [not isinstance(r, Exception) and int(r) == 1 for r in results]

    async def release_lease(self, shard: int, token: str) -> None:
        # Expire at once so a successor need not wait out the lease after a clean stop.
        await self._renew(keys=[self.lease_key(shard)], args=[token, 1])

    async def release_leases(self, shards: list[int], token: str) -> None:
        """``release_lease`` of several shards in one pipeline (a lease not held is untouched)."""
        await self._lease_each(self._renew, shards, token, 1)
