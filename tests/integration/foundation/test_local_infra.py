"""The Docker-free infrastructure: a 3-node KRaft cluster survives a node loss; nothing is orphaned."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shared.infra import KafkaCluster
from tests.helpers import wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


async def _partition_with_leader(admin: AIOKafkaAdminClient, topic: str) -> dict[str, Any]:
    """The topic's partition 0 once the brokers' metadata has it with a leader.

    Right after create_topics the broker answering describe_topics may not have applied the new
    topic yet (no partitions, or leader -1): wait for it with a deadline.
    """

    async def described() -> dict[str, Any] | None:
        (topic_meta,) = await admin.describe_topics([topic])
        parts = topic_meta.get("partitions") or []
        if topic_meta.get("error_code", 0) == 0 and parts and parts[0]["leader"] >= 0:
            return dict(parts[0])
        return None

    return await wait_for(described, timeout=30, interval=0.1, message=f"{topic} leader")


async def test_three_node_cluster_keeps_acks_all_writes_when_a_broker_dies() -> None:
    # Secure, like the suite's broker: brokers fail over on the mTLS inter-broker listener.
    cluster = KafkaCluster(nodes_count=3, heap="384m", secure=True)
    cluster.start()
    options = cluster.client_options()
    try:
        admin = AIOKafkaAdminClient(**options, bootstrap_servers=cluster.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic("ha", 1, 3, topic_configs={"min.insync.replicas": "2"})]
            )
            partition = await _partition_with_leader(admin, "ha")
        finally:
            await admin.close()
        assert len(partition["replicas"]) == 3
        leader_index = partition["leader"] - 1
        producer = AIOKafkaProducer(
            **options,
            bootstrap_servers=cluster.bootstrap,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=30000,
        )
        await producer.start()
        try:
            await producer.send_and_wait("ha", b"before")
            cluster.stop_node(leader_index, kill=True)
            await producer.send_and_wait("ha", b"after")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            **options, bootstrap_servers=cluster.bootstrap, enable_auto_commit=False
        )
        await consumer.start()
        try:
            tp = TopicPartition("ha", 0)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            seen: list[bytes] = []

            async def both() -> bool:
                batch = await consumer.getmany(tp, timeout_ms=500)
                seen.extend(r.value for r in batch.get(tp, []))
                return seen == [b"before", b"after"]

            await wait_for(both, timeout=60, message="both records after the leader died")
        finally:
            await consumer.stop()
    finally:
        cluster.stop()
    for node in cluster.nodes:
        assert node.proc is not None and node.proc.poll() is not None


async def test_redis_and_kafka_die_with_a_killed_parent() -> None:
    script = textwrap.dedent(
        """
        import signal
        from shared.infra import LocalKafka, LocalRedis
        r = LocalRedis().start()
        k = LocalKafka(heap="256m").start()
        print(r.proc.pid, k.nodes[0].proc.pid, flush=True)
        signal.pause()
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 120)
        redis_pid, kafka_pid = (int(p) for p in line.split())
        assert _alive(redis_pid) and _alive(kafka_pid)
        parent.send_signal(signal.SIGKILL)
        await asyncio.wait_for(parent.wait(), 10)
        await wait_for(
            lambda: not _alive(redis_pid) and not _alive(kafka_pid),
            timeout=30,
            message="children gone after the parent was SIGKILLed",
        )
    finally:
        if parent.returncode is None:
            parent.kill()
