"""Redis storage: allowlist state, version, history and outbox change in one Lua script."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from services.settings.domain import Allowlist, Change, history_delta
from shared.messages import AllowlistChanged, AuditRecorded

KeyBuilder = Callable[..., str]

# Compare-and-set on the version: the state, the version, the history record and the outbox
# entry are written by one script, so Redis never holds a half-applied change, and the outbox
# stream's order is the commit order (hence each account's version order).
# History is a sorted set scored by version (a page is one range read), trimmed here to the
# newest ARGV[9] records so it is bounded per account whatever the write rate. An account
# still holding the old unbounded list (KEYS[5]) has its newest records moved over once.
_COMMIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, tostring(current)}
end
local keep = tonumber(ARGV[9])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[5]) == 1 then
  for _, item in ipairs(redis.call('LRANGE', KEYS[5], -keep, -1)) do
    redis.call('ZADD', KEYS[3], cjson.decode(item)['version'], item)
  end
  redis.call('DEL', KEYS[5])
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(keep + 1))
local id = redis.call('XADD', KEYS[4], '*',
  'account', ARGV[5], 'version', ARGV[2], 'event', ARGV[6], 'audit', ARGV[7], 'at', ARGV[8])
return {1, id}
"""

# Only the relay that still holds the leader lease may mark entries published; a relay that
# lost it leaves them for the new leader, which republishes them (duplicates, never gaps).
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

_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


@dataclass(frozen=True)
class OutboxRecord:
    """One committed change waiting to be published, in commit order."""

    stream_id: bytes
    account_id: str
    version: int
    event: bytes
    audit: bytes
    committed_at_ms: int


class RedisAllowlistStore:
    """The allowlist, its history and the transactional outbox, under ``<prefix>settings:``."""

    def __init__(self, redis: Redis, keys: KeyBuilder, history_max_records: int = 1000) -> None:
        self._redis = redis
        self._keys = keys
        self._history_max_records = history_max_records
        self._commit = redis.register_script(_COMMIT)
        self._mark = redis.register_script(_MARK_PUBLISHED)
        self._renew = redis.register_script(_RENEW_LEASE)
        self.outbox_key = keys("outbox")
        self.lease_key = keys("relay", "leader")

    def _account_key(self, account_id: str, part: str) -> str:
        return self._keys("allowlist", account_id, part)

    async def load(self, account_id: str) -> Allowlist:
        raw = await self._redis.get(self._account_key(account_id, "state"))
        if raw is None:
            return Allowlist(account_id=account_id)
        return Allowlist.model_validate_json(raw)

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
            keys=[
                self._account_key(account_id, "version"),
                self._account_key(account_id, "state"),
                self._account_key(account_id, "history-by-version"),
                self.outbox_key,
                self._account_key(account_id, "history"),
            ],
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

    async def pending(self, count: int) -> list[OutboxRecord]:
        """The oldest unpublished outbox entries, in commit order."""
        rows: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrange(
            self.outbox_key, "-", "+", count=count
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

    async def outbox_depth(self) -> int:
        return int(await self._redis.xlen(self.outbox_key))

    async def mark_published(self, lease_token: str, records: list[OutboxRecord]) -> bool:
        newest: dict[str, int] = {}
        for record in records:
            newest[record.account_id] = max(newest.get(record.account_id, 0), record.version)
        accounts = list(newest)
        result = await self._mark(
            keys=[
                self.lease_key,
                self.outbox_key,
                *(self._account_key(a, "published") for a in accounts),
            ],
            args=[
                lease_token,
                len(records),
                *(r.stream_id for r in records),
                *(newest[a] for a in accounts),
            ],
        )
        return int(result) == 1

    async def acquire_lease(self, token: str, lease_ms: int) -> bool:
        return bool(await self._redis.set(self.lease_key, token, nx=True, px=lease_ms))

    async def renew_lease(self, token: str, lease_ms: int) -> bool:
        return int(await self._renew(keys=[self.lease_key], args=[token, lease_ms])) == 1

    async def release_lease(self, token: str) -> None:
        # Expire at once so a successor need not wait out the lease after a clean stop.
        await self._renew(keys=[self.lease_key], args=[token, 1])
