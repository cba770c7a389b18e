"""The baseline our pipeline is measured against: a bare aiokafka relay on the same broker."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def bare_relay_rate(bootstrap: str, messages: int, payload_size: int = 600) -> float:
    """Messages/s that one aiokafka process relays (consume a topic, produce to another, acks=all)."""
    source, sink = f"bench-src-{uuid.uuid4().hex[:6]}", f"bench-dst-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(source, 6, 1), NewTopic(sink, 6, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    payload = b"x" * payload_size
    try:
        for i in range(messages):
            await producer.send(source, payload, key=str(i).encode())
        await producer.flush()
        consumer = AIOKafkaConsumer(
            source,
            bootstrap_servers=bootstrap,
            group_id=f"bench-relay-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        relayed = 0
        started = time.perf_counter()
        try:
            while relayed < messages:
                batch = await consumer.getmany(timeout_ms=500, max_records=1000)
                futures = [
                    await producer.send(sink, r.value, key=r.key)
                    for records in batch.values()
                    for r in records
                ]
                if futures:
                    await asyncio.gather(*futures)
                    await consumer.commit()
                relayed += len(futures)
        finally:
            await consumer.stop()
        return relayed / (time.perf_counter() - started)
    finally:
        await producer.stop()
