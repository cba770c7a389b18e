"""Measure one allowlist-history read after 1,000 toggles of a 100-entry list, before and after.

``before``: the unbounded layout main wrote (an RPUSHed list of records each holding the whole
list twice, read whole); ``after``: the bounded sorted set written by the real commit script,
read one default page (50). Each mode runs in its own process so its peak RSS is its own.
Figures are the store read, the record models and the JSON answer, as the route does them.

    .venv/bin/python scripts/measure_history.py
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime

import orjson
from redis.asyncio import Redis

from services.settings import domain
from services.settings.adapters.redis_store import RedisAllowlistStore
from services.settings.api import HistoryRecord, HistoryView
from shared.infra.redis import LocalRedis
from shared.messages import Actor, AllowlistChanged, AllowlistEntry, AuditRecorded

TOGGLES = 1000
ENTRIES = 100
ACCOUNT = "acct-measure"
ACTOR = Actor(sub="soc@platform.example", role="soc")


def _full_list() -> domain.Allowlist:
    now = datetime.now(UTC)
    entries = tuple(
        AllowlistEntry(
            id=f"00000000-0000-4000-8000-{i:012d}",
            name=f"RMM relay {i:03d}",
            address=f"10.20.{i // 250}.{i % 250 + 1}",
            created_at=now,
            created_by="alice@msp.example",
        )
        for i in range(ENTRIES)
    )
    return domain.Allowlist(account_id=ACCOUNT, entries=entries, version=ENTRIES, updated_at=now)


async def _write_toggles(store: RedisAllowlistStore, redis: Redis, old_layout: bool) -> None:
    current = _full_list()
    await redis.set(store._account_key(ACCOUNT, "version"), current.version)
    for _ in range(TOGGLES):
        change = domain.set_enabled(current, not current.enabled, datetime.now(UTC))
        assert change is not None
        event = AllowlistChanged(
            account_id=ACCOUNT,
            enabled=change.after.enabled,
            entries=change.after.entries,
            version=change.after.version,
            updated_at=datetime.now(UTC),
            changed_by=ACTOR,
        )
        if old_layout:
            record = {
                "version": change.after.version,
                "action": change.action,
                "actor": ACTOR.model_dump(mode="json"),
                "at": event.occurred_at.isoformat(),
                "detail": change.detail,
                "before": change.before.summary(),
                "after": change.after.summary(),
                "event_id": event.id,
            }
            await redis.rpush(store._account_key(ACCOUNT, "history"), orjson.dumps(record))
        else:
            audit = AuditRecorded(
                service="settings", action=change.action, outcome="ok", actor=ACTOR
            )
            assert await store.commit(change, event, audit)
        current = change.after


async def _read(store: RedisAllowlistStore, redis: Redis, old_layout: bool) -> bytes:
    if old_layout:
        raw = await redis.lrange(store._account_key(ACCOUNT, "history"), -1000, -1)
        records = [orjson.loads(item) for item in reversed(raw)]
        next_before = None
    else:
        records = await store.history(ACCOUNT, limit=51)
        next_before = int(records[49]["version"]) if len(records) > 50 else None
        records = records[:50]
    view = HistoryView(
        account_id=ACCOUNT,
        version=ENTRIES + TOGGLES,
        records=[HistoryRecord.model_validate(r) for r in records],
        next_before_version=next_before,
    )
    return view.model_dump_json().encode()


async def _measure(mode: str, url: str) -> dict[str, object]:
    redis = Redis.from_url(url)
    old_layout = mode == "before"
    store = RedisAllowlistStore(redis, lambda *p: ":".join((mode, *p)))
    await _write_toggles(store, redis, old_layout)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu, wall = time.process_time(), time.perf_counter()
    body = await _read(store, redis, old_layout)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stored = (
        await redis.llen(store._account_key(ACCOUNT, "history"))
        if old_layout
        else await store.history_size(ACCOUNT)
    )
    await redis.aclose()
    return {
        "mode": mode,
        "records_stored": stored,
        "records_answered": len(orjson.loads(body)["records"]),
        "answer_bytes": len(body),
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 4),
        "peak_rss_growth_mib": round((rss_after - rss_before) / 1024, 1),
    }


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(asyncio.run(_measure(sys.argv[1], sys.argv[2]))))
        return
    redis = LocalRedis().start()
    try:
        for mode in ("before", "after"):
            out = subprocess.run(
                [sys.executable, __file__, mode, redis.url], check=True, capture_output=True
            )
            print(out.stdout.decode().strip())
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
