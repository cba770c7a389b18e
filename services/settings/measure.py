"""``python -m services.settings.measure``: write latency (write → event readable) and writes/s.

Starts its own Kafka broker and redis-server (or uses HOSTISO_KAFKA_BOOTSTRAP/HOSTISO_REDIS_URL
with ``--use-env``), runs the settings app in-process over ASGI, and reads the topic with a
separate consumer so a write counts only once its event can be read back.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.settings.bootstrap import build_app
from services.settings.config import SettingsServiceSettings
from shared.auth import SCOPE_ALLOWLIST_READ, SCOPE_ALLOWLIST_WRITE, mint_token
from shared.kafka import ensure_topics
from shared.messages import decode
from shared.topics import TopicName, Topics


class TopicWatcher:
    """Records when each (account, version) becomes readable on the allowlist topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._topic = topic
        self.seen: dict[tuple[str, int], float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self._topic)
        while not parts:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self._topic)
        tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    event = decode(TopicName.SETTINGS_ALLOWLIST, record.value)
                    self.seen.setdefault((event.account_id, event.version), now)

    async def readable(self, account_id: str, version: int, timeout: float = 30) -> float:
        deadline = time.perf_counter() + timeout
        while (account_id, version) not in self.seen:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{account_id} v{version} never readable")
            await asyncio.sleep(0.001)
        return self.seen[(account_id, version)]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(bootstrap: str, redis_url: str, writes: int, concurrency: int) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    settings = SettingsServiceSettings(
        dev=True,
        kafka_bootstrap=bootstrap,
        redis_url=redis_url,
        topic_prefix=f"measure{suffix}.",
        redis_prefix=f"measure{suffix}:",
        log_level="WARNING",
    )
    topics = Topics(settings.topic_prefix)
    await ensure_topics(bootstrap, topics)
    app = build_app(settings)
    token = mint_token(
        settings.require_secret("jwt_secret"),
        sub="measure",
        role="service",
        scopes=[SCOPE_ALLOWLIST_READ, SCOPE_ALLOWLIST_WRITE],
    )
    headers = {"Authorization": f"Bearer {token}"}
    watcher = TopicWatcher(bootstrap, topics.settings_allowlist)
    async with app.router.lifespan_context(app):
        await watcher.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:

            async def write(account: str, i: int) -> tuple[float, float]:
                started = time.perf_counter()
                # Toggling the switch is a change every time (entries would hit the limit).
                response = await client.patch(
                    f"/v1/accounts/{account}/tooling-allowlist",
                    json={"enabled": i % 2 == 0},
                    headers=headers,
                )
                answered = time.perf_counter()
                response.raise_for_status()
                readable = await watcher.readable(account, response.json()["version"])
                return answered - started, readable - started

            # Warm-up: metadata, connections.
            for i in range(10):
                await write("acct-warmup", i)
            latencies = [await write("acct-latency", i) for i in range(writes)]

            per_worker = max(1, writes // concurrency)

            async def worker(w: int) -> None:
                for i in range(per_worker):
                    await write(f"acct-load-{w}", i)

            started = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            elapsed = time.perf_counter() - started
        await watcher.stop()
    answer = [a * 1000 for a, _ in latencies]
    readable = [r * 1000 for _, r in latencies]
    return {
        "sequential_writes": writes,
        "answer_ms_p50": round(statistics.median(answer), 2),
        "answer_ms_p99": round(_percentile(answer, 0.99), 2),
        "readable_ms_p50": round(statistics.median(readable), 2),
        "readable_ms_p99": round(_percentile(readable, 0.99), 2),
        "concurrent_writers": concurrency,
        "concurrent_writes": per_worker * concurrency,
        "writes_per_s": round(per_worker * concurrency / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--use-env", action="store_true", help="use HOSTISO_* Kafka and Redis")
    args = parser.parse_args()
    if args.use_env:
        base = SettingsServiceSettings(dev=True)
        result = asyncio.run(
            measure(base.kafka_bootstrap, base.redis_url, args.writes, args.concurrency)
        )
    else:
        from shared.infra import LocalKafka, LocalRedis

        with LocalKafka() as kafka, LocalRedis() as redis:
            result = asyncio.run(measure(kafka.bootstrap, redis.url, args.writes, args.concurrency))
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
