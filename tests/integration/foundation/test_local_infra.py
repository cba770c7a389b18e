"""The Docker-free infrastructure: a 3-node KRaft cluster survives a node loss; nothing is orphaned."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

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


async def test_three_node_cluster_keeps_acks_all_writes_when_a_broker_dies() -> None:
    cluster = KafkaCluster(nodes_count=3, heap="384m")
    cluster.start()
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        await admin.start()
        await admin.create_topics(
            [NewTopic("ha", 1, 3, topic_configs={"min.insync.replicas": "2"})]
        )
        described = await admin.describe_topics(["ha"])
        await admin.close()
        partition = described[0]["partitions"][0]
        assert len(partition["replicas"]) == 3
        leader_index = partition["leader"] - 1
        producer = AIOKafkaProducer(
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
        consumer = AIOKafkaConsumer(bootstrap_servers=cluster.bootstrap, enable_auto_commit=False)
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
