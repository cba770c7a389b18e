"""Every message type round-trips through the real broker; topics carry the designed config."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.kafka import make_producer, publish
from shared.topics import TOPIC_SPECS, Topics
from tests.helpers import kafka_admin_options, read_topic
from tests.samples import SAMPLES


async def test_every_message_type_round_trips_through_real_kafka(
    kafka_bootstrap: str, topics: Topics
) -> None:
    producer = make_producer(kafka_bootstrap, options=kafka_admin_options())
    await producer.start()
    try:
        for topic, key, message in SAMPLES:
            await publish(producer, topics(topic), key, message)
    finally:
        await producer.stop()
    for topic in {t for t, _, _ in SAMPLES}:
        sent = [m for t, _, m in SAMPLES if t == topic]
        received = await read_topic(kafka_bootstrap, topics, topics(topic), expect=len(sent))
        assert sorted(received, key=lambda m: m.id) == sorted(sent, key=lambda m: m.id)


async def test_topics_have_designed_partitions_and_cleanup_policy(
    kafka_bootstrap: str, topics: Topics
) -> None:
    admin = AIOKafkaAdminClient(**kafka_admin_options(), bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topics(s.name) for s in TOPIC_SPECS])
        partitions = {d["topic"]: len(d["partitions"]) for d in described}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics(s.name)) for s in TOPIC_SPECS]
        )
    finally:
        await admin.close()
    cleanup = {}
    for response in configs:
        for resource in response.resources:
            name = resource[3]
            for entry in resource[4]:
                if entry[0] == "cleanup.policy":
                    cleanup[name] = entry[1]
    for spec in TOPIC_SPECS:
        assert partitions[topics(spec.name)] == spec.partitions
        assert cleanup[topics(spec.name)] == spec.cleanup_policy
